"""Bad input everywhere a user can give it, and the numerical guards: precise errors, no damage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.trainer import Trainer

LOSSES = {"a": F.cross_entropy, "b": lambda o, y: F.cross_entropy(o[:, :2], y),
          "d": F.mse_loss}


def _targets(n: int = 2) -> dict[str, torch.Tensor]:
    return {"a": torch.arange(n) % 2, "b": torch.arange(n) % 2, "d": torch.zeros(n, 1, 8, 8)}


def _snapshot(s: rs.Surgeon) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*s.model.state_dict().values(),
                                         *s.importance_bank.parameters()]]


def _same(s: rs.Surgeon, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _snapshot(s)))


def test_wrong_inputs_at_call_time(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    before = _snapshot(s)
    with pytest.raises(rs.InputError, match=r"shape \(2, 4, 16, 16\), the model was traced with "
                                            r"\(2, 3, 16, 16\) and fails on it: .*channels"):
        s(torch.randn(2, 4, 16, 16))
    with pytest.raises(rs.InputError, match=r"dtype torch\.float64, .*traced with torch\.float32"):
        s(x.double())
    with pytest.raises(rs.InputError, match=r"dtype torch\.int64"):
        s(x.long())
    with pytest.raises(rs.InputError, match=r"has 3 dims \(3, 16, 16\), the example had 4"):
        s(x[0])
    with pytest.raises(rs.InputError, match=r"traced with 1 tensor inputs, got 2"):
        s(x, x)
    with pytest.raises(rs.InputError, match=r"on meta but the model's parameters are on cpu"):
        s(x.to("meta"))
    assert _same(s, before)
    assert s(torch.randn(3, 3, 20, 20))["d"].shape == (3, 1, 10, 10)  # free sizes still work
    tr = Trainer(s.train(), torch.optim.SGD(s.model_parameters(), lr=0.1), progress=False)
    with pytest.raises(rs.InputError, match=r"dtype torch\.float64"):  # the method's forward
        tr.train_step(x.double(), _targets(), LOSSES)
    assert _same(s, before) and tr.step_count == 0


def test_model_on_another_device_than_inputs(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    s.model.to("meta")  # the user moved the model after instrumenting
    with pytest.raises(rs.InputError, match=r"input 0 is on cpu but the model's parameters are "
                                            r"on meta"):
        s(x)


def test_tasks_named_twice(net: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises(rs.TaskError, match=r"unique; repeated: \['a'\]"):
        rs.instrument(net, x, tasks=["a", "a", "d"])


def test_loss_fns_for_unknown_or_missing_tasks(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), progress=False)
    before = _snapshot(s)
    with pytest.raises(rs.LossError, match=r"missing \[\], unknown \['z'\]"):
        tr.train_step(x, _targets(), {**LOSSES, "z": F.mse_loss})
    with pytest.raises(rs.LossError, match=r"missing \['d'\], unknown \[\]"):
        tr.train_step(x, _targets(), {"a": LOSSES["a"], "b": LOSSES["b"]})
    with pytest.raises(rs.LossError, match=r"missing \['b'\]"):
        tr.fit_epoch([(x, _targets())], {"a": LOSSES["a"], "d": LOSSES["d"]})
    assert _same(s, before) and tr.step_count == 0 and tr.history == []


class CalledTwice(nn.Module):
    """One conv applied twice (weights shared between two depths), heads at both depths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.ha = nn.Linear(6, 2)
        self.hb = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c(F.relu(self.stem(x))))
        z = F.relu(self.c(y))
        return {"a": self.ha(y.mean((2, 3))), "b": self.hb(z.mean((2, 3)))}


def test_shared_module_called_twice_is_supported_and_kept_consistent() -> None:
    """Supported: both calls count for the route sets, and the module's output channels are
    coupled to its own input channels (and so to the stem's), so routes prune them together."""
    torch.manual_seed(0)
    m = CalledTwice().eval()
    x = torch.randn(2, 3, 8, 8)
    s = rs.instrument(m, x)
    assert s.param_tasks()["c.weight"] == {"a", "b"}
    routes = s.export_routes(keep=0.5, scores="magnitude")  # verified against masked refs
    for t, route in routes.items():
        shapes = {n: tuple(p.shape) for n, p in route.named_parameters()}
        o, i = shapes["c.weight"][:2]
        assert o == i == shapes["stem.weight"][0] < 6, t  # one coupled group: out = in = stem
    full = s.export_routes(keep=1.0, scores="magnitude")
    with torch.no_grad():
        ref = m(x)
        for t, route in full.items():
            out = route(x)
            out = out[t] if isinstance(out, dict) else out
            assert torch.allclose(out, ref[t], atol=1e-6), t


class Mutating(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.ha = nn.Linear(4, 2)
        self.hb = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.act(self.c(x))  # supported: nobody else reads c's output
        z = y.mean((2, 3))
        a = self.ha(z)
        if self.mode == "side-effect":
            z.mul_(2)  # result unused: rewritten to z = z.mul(2) (z has no other alias)
        elif self.mode == "side-effect-view":
            v = z[:, :2]  # a view of z, read after the mutation: not rewritable
            z.mul_(2)
            a = a + v.sum()
        elif self.mode == "side-effect-input":
            x.mul_(2)  # mutates the caller's tensor
            a = a + x.mean()
        elif self.mode == "alias":
            w = z.add_(1)  # mutates z, which ha and hb also read
            a = a + w.sum()
        return {"a": a, "b": self.hb(z)}


def test_inplace_ops(x: torch.Tensor) -> None:
    s = rs.instrument(Mutating("none").eval(), x)  # ReLU(inplace=True) in a chain is fine
    assert set(s.tasks) == {"a", "b"}
    m = Mutating("side-effect").eval()
    s = rs.instrument(m, x)  # the unaliased x.mul_(2) is rewritten out of place
    with torch.no_grad():
        ref = m(x)
        got = s(x)
        assert all(torch.equal(got[t], ref[t]) for t in ref)
        for t, route in s.export_routes(keep=1.0).items():
            out = route(x)
            assert torch.equal(out[t] if isinstance(out, dict) else out, ref[t])
    for mode in ("side-effect-view", "side-effect-input"):
        with pytest.raises(rs.TracingError, match=r"in-place op 'call_method mul_' .* result is "
                                                  r"unused: .*out of place"):
            rs.instrument(Mutating(mode).eval(), x.clone())
    with pytest.raises(rs.TracingError, match=r"in-place op 'call_method add_' .*mutates 'mean', "
                                              r"which \['ha'.*also read"):
        rs.instrument(Mutating("alias").eval(), x)


def test_corrupt_checkpoint_leaves_the_run_untouched(net: nn.Module, x: torch.Tensor,
                                                     tmp_path: Path) -> None:
    s = rs.instrument(net.train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), progress=False)
    tr.train_step(x, _targets(), LOSSES)
    path = tmp_path / "run.ckpt"
    tr.save_checkpoint(str(path))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    path.write_bytes(bytes(raw))
    before = _snapshot(s)
    with pytest.raises(rs.CheckpointError, match=r"corrupt: payload SHA-256 does not match"):
        tr.load_checkpoint(str(path))
    assert _same(s, before) and tr.step_count == 1


# -- numerical guards ----------------------------------------------------------------------------
class SqrtHead(nn.Module):
    """Head b takes sqrt(z - z.detach()): finite forward (0), infinite gradient into the trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.ha = nn.Linear(4, 2)
        self.hb = nn.Linear(4, 2)
        self.poison = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3))
        zb = torch.sqrt(z - z.detach()) + z
        return {"a": self.ha(z), "b": self.hb(zb)}


def _ab(n: int = 4) -> dict[str, torch.Tensor]:
    return {"a": torch.arange(n) % 2, "b": torch.arange(n) % 2}


AB = {"a": F.cross_entropy, "b": F.cross_entropy}


def test_nonfinite_gradient_is_stopped_before_weights_and_importance(x: torch.Tensor) -> None:
    x = torch.randn(4, 3, 8, 8)
    s = rs.instrument(SqrtHead().train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), method="drmgf-step",
                 max_nonfinite=3, progress=False)
    before = _snapshot(s)  # includes the importance variables Taylor mode would update
    for _ in range(2):
        assert tr.train_step(x[:4], _ab(), AB) is None
    assert tr.skipped == 2 and _same(s, before)
    with pytest.raises(rs.LossError, match=r"consecutive steps skipped; last: non-finite gradient"
                                           r".*Task 'b' back-propagates a non-finite gradient; "
                                           r"it first reaches layer 'c2'"):
        tr.train_step(x[:4], _ab(), AB)
    assert _same(s, before)


def test_drmgf_epoch_guards_count_skips_and_name_task_and_layer(net: nn.Module,
                                                                 x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.01), method="drmgf",
                 config={"cycle_steps": 2, "s_batches": 1}, max_nonfinite=100, progress=False)
    calls = {"n": 0}

    def flaky(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(math.nan) if calls["n"] % 3 == 0 else F.mse_loss(o, y)

    data = [(x, _targets()), (x, _targets())]
    rec = tr.fit_epoch(data, {**LOSSES, "d": flaky})
    assert rec["skipped_epoch"] > 0 and tr.history[-1]["skipped"] == rec["skipped_epoch"]
    for p in [*s.model_parameters(), *s.importance_parameters(), *s.scale_parameters()]:
        assert torch.isfinite(p).all()
    tr.max_nonfinite = 2
    bad = x.clone()
    bad[0, 0, 0, 0] = math.inf
    with pytest.raises(rs.LossError, match=r"non-finite loss for tasks \['a', 'b', 'd'\] in the a "
                                           r"pass.*first appear in the forward at input 'x'"):
        tr.fit_epoch([(bad, _targets())] * 2, LOSSES)
    with torch.no_grad():
        net.c2.weight[0, 0, 0, 0] = math.inf  # a broken layer
    tr._consecutive_bad = 0
    with pytest.raises(rs.LossError, match=r"first appear in the forward at layer 'c2'"):
        tr.fit_epoch([(x, _targets())] * 2, LOSSES)
