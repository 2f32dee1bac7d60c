"""One eval-mode trace serves both modes only when provably the same graph; otherwise two."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath  # branches on self.training in Python
from torch import nn

import routesurgeon as rs


def _same_in_both_modes(s: rs.Surgeon, m: nn.Module, x: torch.Tensor) -> None:
    """The surgeon equals the model in eval mode and, for the same random draws, in train mode."""
    for training in (False, True):
        s.train(training)
        assert m.training is training
        torch.manual_seed(3)
        want = m(x)
        torch.manual_seed(3)
        got = s(x)
        for k in want:
            assert torch.equal(got[k], want[k]), (training, k)
    s.eval()


class ResidualDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = DropPath(0.5)
        self.a = nn.Conv2d(8, 2, 1)
        self.b = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.stem(x))
        y = y + self.drop(self.body(y))
        return {"a": self.a(y), "b": self.b(y)}


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(8, 2, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.dropout(self.c(x), 0.5, self.training)  # the flag becomes a constant of the graph
        return {"a": self.a(y), "b": self.b(y)}


class LeavesOnly(nn.Module):
    """Mode-dependent behaviour only inside torch.nn leaves (BatchNorm, Dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.a = nn.Conv2d(8, 2, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.drop(F.relu(self.bn(self.c(x))))
        return {"a": self.a(y), "b": self.b(y)}


def test_drop_path_branch_traces_both_modes(x: torch.Tensor) -> None:
    m = ResidualDropPath().eval()
    s = rs.instrument(m, x)
    assert s.traced.dual
    assert "drop" in s.traced.retrace_reason
    assert not m.training  # instrument restored the user's mode
    _same_in_both_modes(s, m, x)
    train_ops = {n.target for n in s.traced.train_graph.graph.nodes}
    assert "bernoulli_" in train_ops
    assert "bernoulli_" not in {n.target for n in s.traced.eval_graph.graph.nodes}


def test_functional_dropout_flag_traces_both_modes(x: torch.Tensor) -> None:
    m = FunctionalDropout().train()
    s = rs.instrument(m, x)
    assert s.traced.dual and "<root>" in s.traced.retrace_reason
    _same_in_both_modes(s, m, x)
    s.eval()
    assert torch.equal(s(x)["a"], m.eval()(x)["a"])


def test_mode_only_in_leaves_is_traced_once(x: torch.Tensor) -> None:
    m = LeavesOnly().train()
    s = rs.instrument(m, x)
    assert not s.traced.dual
    assert s.traced.retrace_reason == ""
    assert s.traced.train_graph is s.traced.eval_graph
    _same_in_both_modes(s, m, x)  # BatchNorm batch statistics and dropout masks in train mode
    assert s.timings["total"] >= s.timings["trace"] > 0
    assert set(s.timings) == {"trace", "run", "verify", "analyse", "surgeon", "total"}


def test_probe_is_removed_after_success_and_failure(x: torch.Tensor) -> None:
    rs.instrument(LeavesOnly(), x)
    assert "training" not in nn.Module.__dict__

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c(x)
            if y.sum() > 0:  # data-dependent: untraceable in the root module
                return y
            return -y

    with pytest.raises(rs.TracingError):
        rs.instrument(Bad(), x)
    assert "training" not in nn.Module.__dict__
    m = LeavesOnly()
    m.eval()
    assert m.training is False and m.bn.training is False


class FlagOnlyTrain(LeavesOnly):
    """Overrides train() like smp's SegmentationModel: only flags change (bn stays frozen)."""

    def train(self, mode: bool = True) -> FlagOnlyTrain:
        self.training = mode
        for name, child in self.named_children():
            child.train(mode and name != "bn")
        return self


class StatefulTrain(LeavesOnly):
    """Overrides train() to change state the forward reads without reading ``training``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def train(self, mode: bool = True) -> StatefulTrain:
        super().train(mode)
        self.scale = 2.0 if mode else 1.0
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        return {"a": out["a"] * self.scale, "b": out["b"]}


def test_train_override_that_only_sets_flags_is_traced_once(x: torch.Tensor) -> None:
    m = FlagOnlyTrain().eval()
    s = rs.instrument(m, x)
    assert not s.traced.dual and s.traced.retrace_reason == ""
    _same_in_both_modes(s, m, x)
    assert m.bn.training is False  # train() kept it frozen, and the graph ran it as it is


class NestedStateTrain(LeavesOnly):
    """Overrides train() to change a nested config object's field."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = SimpleNamespace(scale=1.0)

    def train(self, mode: bool = True) -> NestedStateTrain:
        super().train(mode)
        self.cfg.scale = 2.0 if mode else 1.0
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        return {"a": out["a"] * self.cfg.scale, "b": out["b"]}


@pytest.mark.parametrize("cls", [StatefulTrain, NestedStateTrain])
def test_train_override_with_state_is_traced_in_train_mode(cls: type, x: torch.Tensor) -> None:
    m = cls().eval()
    s = rs.instrument(m, x)
    assert "train()" in s.traced.retrace_reason
    assert s.traced.dual
    assert (m.scale if cls is StatefulTrain else m.cfg.scale) == 1.0  # restored
    _same_in_both_modes(s, m, x)


class ModeShapedLeaf(nn.Module):
    """An opaque leaf whose output channel count depends on the mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] if self.training else x


class BranchOnLeafShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)
        self.leaf = ModeShapedLeaf()
        self.a2 = nn.Conv2d(2, 2, 1)
        self.a4 = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.c(x)
        z = self.leaf(y)
        a = self.a2(z) if z.shape[1] == 2 else self.a4(z)  # specialised on the leaf's output
        return {"a": a, "b": self.b(y)}


def test_specialising_on_a_leaf_output_traces_both_modes(x: torch.Tensor) -> None:
    m = BranchOnLeafShape().eval()
    s = rs.instrument(m, x, leaf_modules=["leaf"])
    assert s.trace_path.startswith("fx-concrete")
    assert "leaf" in s.traced.retrace_reason
    assert s.traced.dual
    _same_in_both_modes(s, m, x)


def test_buffer_reassigned_in_forward_is_restored(x: torch.Tensor) -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 2, 1)
            self.d = nn.Conv2d(3, 2, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            self.calls = self.calls + 1  # replaces the registered tensor
            return {"a": self.c(x), "b": self.d(x)}

    m = Counter()
    before = m.calls
    rs.instrument(m, x)
    assert m.calls is before and float(m.calls) == 0.0
