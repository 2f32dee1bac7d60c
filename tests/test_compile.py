"""torch.compile and torch.export: the Surgeon, training steps, exported routes (CPU).

Compiling is slow, so the nets are tiny and most checks use the ``aot_eager`` backend (dynamo's
capture and AOTAutograd's forward/backward split, which is what changes the semantics; no C++
code generation). One check compiles a ``drmgf-step`` step with inductor, the default backend
(the whole graph, ``ProbedGraph``); depth mode takes the segmented path (``eager_nodes``).
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.compile import ProbedGraph


class Tiny(nn.Module):
    """Two shared conv-BN-ReLU blocks (a residual sum) and three heads, one of them dense."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.ha = nn.Linear(4, 3)
        self.hb = nn.Linear(4, 2)
        self.hd = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.b1(self.c1(x)))
        y = y + F.relu(self.b2(self.c2(y)))
        z = y.mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z), "d": self.hd(y)}


LOSSES = {"a": F.cross_entropy, "b": F.cross_entropy, "d": F.mse_loss}


def _data(n: int = 3, batch: int = 4) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, 8, 8, generator=g)
        out.append((x, {"a": torch.randint(0, 3, (batch,), generator=g),
                        "b": torch.randint(0, 2, (batch,), generator=g),
                        "d": torch.randn(batch, 1, 8, 8, generator=g)}))
    return out


def _trainer(method: str, compile: Any = False, config: dict[str, Any] | None = None,
             **kw: Any) -> tuple[rs.Trainer, rs.Surgeon]:
    torch.manual_seed(0)
    s = rs.instrument(Tiny().train(), torch.randn(2, 3, 8, 8))
    opt = torch.optim.SGD(s.model_parameters(), lr=0.1)
    return rs.Trainer(s, opt, method=method, config=config, compile=compile, progress=False,
                      **kw), s


def _state(s: rs.Surgeon) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*s.model.parameters(), *s.importance_parameters()]]


def _train_both(method: str, compile: Any, config: dict[str, Any] | None = None, steps: int = 3,
                **kw: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], rs.Trainer]:
    torch._dynamo.reset()
    (eager, s0), (comp, s1) = _trainer(method, False, config, **kw), _trainer(
        method, compile, config, **kw)
    for i, (x, y) in enumerate(_data(steps)):
        for tr in (eager, comp):
            torch.manual_seed(i)  # pcgrad draws its projection order from the global RNG
            assert tr.train_step(x, y, LOSSES) is not None
    return _state(s0), _state(s1), comp


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float) -> float:
    worst = max(float((u - v).abs().max()) for u, v in zip(a, b, strict=True))
    assert worst <= tol, worst
    return worst


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler (make test installs g++)")
def test_drmgf_step_step_compiled_with_inductor_equals_eager() -> None:
    """Per-task gradients at the shared layers' outputs: the graph is compiled whole with the
    shared weights detached and a probe at each shared layer's output; the step (weights and
    Taylor importance) equals eager's."""
    a, b, tr = _train_both("drmgf-step", True)
    assert isinstance(tr.method._plan["run"], ProbedGraph)
    _close(a, b, 1e-5)


@pytest.mark.parametrize(("method", "config"), [
    ("drmgf-step", {"mode": "depth", "per_task_from": 0.5}),
    ("equal", None), ("pcgrad", None), ("imta-ge", None), ("famo", None),
])
def test_methods_compiled_equal_eager(method: str, config: dict[str, Any] | None) -> None:
    a, b, tr = _train_both(method, {"backend": "aot_eager"}, config)
    if method == "drmgf-step":  # depth mode: in segments between the eager shared layers
        assert not isinstance(tr.method._plan["run"], ProbedGraph)
    _close(a, b, 1e-5)


def test_compile_and_bf16_together() -> None:
    a, b, _ = _train_both("drmgf-step", {"backend": "aot_eager"}, precision="bf16")
    assert all(bool(torch.isfinite(t).all()) for t in b)
    _close(a, b, 1e-2)


def test_compile_refusals_say_which_and_why() -> None:
    with pytest.raises(rs.CompileError, match=r"'drmgf' cannot train under torch.compile.*"
                                              r"functional_call"):
        _trainer("drmgf", True)
    with pytest.raises(rs.CompileError, match=r"'drmgf-step'.*mode='branch' re-assigns"):
        _trainer("drmgf-step", True, {"mode": "branch"})
    for method in ("drmgf-step", "pcgrad"):
        with pytest.raises(rs.CompileError, match=r"mode='reduce-overhead'.*CUDA-graph"):
            _trainer(method, "reduce-overhead")
    with pytest.raises(rs.CompileError, match=r"unknown torch.compile mode 'fast'"):
        _trainer("equal", "fast")
    with pytest.raises(rs.CompileError, match=r"unknown compile options \['fullgrap'\]"):
        _trainer("equal", {"fullgrap": True})
    tr, _ = _trainer("equal", "reduce-overhead")  # one backward per forward: allowed
    assert tr.compile is not None and tr.compile.mode == "reduce-overhead"


def test_surgeon_forward_and_backward_compiled() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    s = rs.instrument(Tiny().train(), torch.randn(2, 3, 8, 8))
    x, y = _data(1)[0]
    grads = []
    for fn in (s, torch.compile(s, backend="aot_eager")):
        s.zero_grad(set_to_none=True)
        out = fn(x)
        sum(LOSSES[t](out[t], y[t]) for t in out).backward()  # type: ignore[union-attr]
        grads.append([p.grad.clone() for p in s.model.parameters()])
    _close(grads[0], grads[1], 1e-5)


def test_exported_routes_compile_fullgraph_and_torch_export() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    s = rs.instrument(Tiny().eval(), torch.randn(2, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    routes = s.export_routes(keep=0.5, scores="magnitude")
    union = s.export_routes(keep=0.5, scores="magnitude", union=True)
    with torch.no_grad():
        for task in ("a", "d"):
            route = routes[task]
            want = route(x)
            got = torch.compile(route, fullgraph=True, backend="aot_eager")(x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            ep = torch.export.export(route, (x,))
            torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-6)
        want_u = union(x)
        got_u = torch.export.export(union, (x,)).module()(x)
        assert set(got_u) == set(want_u) == {"a", "b", "d"}
        for t in want_u:
            torch.testing.assert_close(got_u[t], want_u[t], rtol=1e-5, atol=1e-6)
