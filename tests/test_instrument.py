"""instrument(): tracing, task names, topology queries, errors."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.topology import Topology


def test_surgeon_returns_what_the_model_returns(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    assert s.tasks == ["a", "b", "d"]
    with torch.no_grad():
        want, got = net(x), s(x)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k])
    assert s.trace_path == "fx"


def test_shares_parameters_and_keeps_user_model_untouched(net: nn.Module, x: torch.Tensor) -> None:
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = rs.instrument(net, x)
    assert net.training and s.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats not touched by tracing
    assert {id(p) for p in s.model_parameters()} == {id(p) for p in net.parameters()}
    loss = sum(v.sum() for v in s(x).values())
    loss.backward()
    assert net.c1.weight.grad is not None


def test_topology_finds_shared_trunk_and_exclusive_heads(net: nn.Module, x: torch.Tensor) -> None:
    topo = rs.instrument(net, x).topology
    shared = {la.name for la in topo.shared_layers()}
    assert {"c1", "c2", "b1", "b2", "dw"} <= shared
    assert [la.name for la in topo.exclusive_layers("a")] == ["ha"]
    assert [la.name for la in topo.exclusive_layers("d")] == ["dense"]
    summary = topo.summary()
    shared_a = (8 + 16 + 16) / (8 + 16 + 16 + 5)
    assert summary["a"]["shared_filter_fraction"] == pytest.approx(shared_a)
    assert 0 < summary["d"]["flop_share"] <= 1
    with pytest.raises(rs.TaskError, match="tasks are"):
        topo.exclusive_layers("nope")


def test_topology_round_trips(net: nn.Module, x: torch.Tensor, tmp_path) -> None:
    topo = rs.instrument(net, x).topology
    back = Topology.from_json(topo.to_json(tmp_path / "t.json") and tmp_path / "t.json")
    assert nx.utils.graphs_equal(topo.graph, back.graph)
    topo.to_graphml(tmp_path / "t.graphml")
    back2 = Topology.from_graphml(tmp_path / "t.graphml")
    assert back2.tasks == topo.tasks
    assert dict(back2.graph.nodes(data=True)) == dict(topo.graph.nodes(data=True))


def test_task_names_rename_select_and_errors(x: torch.Tensor) -> None:
    class Tup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = self.c(x)
            return y.mean((2, 3)), (y * 2, y.sum(1))

    m = Tup()
    assert rs.instrument(m, x).tasks == ["out0", "out1.0", "out1.1"]
    assert rs.instrument(m, x, tasks=["out1.1", "out0"]).tasks == ["out0", "out1.1"]
    assert rs.instrument(m, x, tasks=["cls", "seg", "depth"]).tasks == ["cls", "seg", "depth"]
    assert rs.instrument(m, x, tasks={"seg": "out1.0"}).tasks == ["seg"]
    with pytest.raises(rs.TaskError, match=r"available outputs: \['out0', 'out1.0', 'out1.1'\]"):
        rs.instrument(m, x, tasks=["cls"])
    with pytest.raises(rs.TaskError, match="unique"):
        rs.instrument(m, x, tasks=["out0", "out0"])


def test_single_output_model_is_one_task(x: torch.Tensor) -> None:
    s = rs.instrument(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), x)
    assert s.tasks == ["out"]
    assert s.topology.shared_layers() == []


def test_tuple_and_dict_inputs() -> None:
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.a(x) + self.b(y)
            return {"p": h.relu(), "q": h.sigmoid()}

    x, y = torch.randn(2, 4), torch.randn(2, 4)
    m = TwoIn()
    s1 = rs.instrument(m, (x, y))
    s2 = rs.instrument(m, {"y": y, "x": x})
    for s in (s1, s2):
        assert torch.equal(s(x, y)["q"], m(x, y)["q"])
        assert len(s.topology.shared_layers()) == 2
    with pytest.raises(rs.InputError, match="do not fit"):
        rs.instrument(m, (x, y, x))
    with pytest.raises(rs.InputError, match="Tensor, a tuple"):
        rs.instrument(m, 3)


def test_shape_dependent_control_flow_is_specialised_and_guarded() -> None:
    class Checks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if x.shape[-1] % 8:
                raise ValueError("width must be divisible by 8")
            y = self.c(x)
            return y, y[:, : len(y) + 1]

    m = Checks().eval()
    x = torch.randn(2, 3, 16, 16)
    s = rs.instrument(m, x)
    assert s.trace_path == "fx-concrete"
    assert s.traced.specializations
    assert s.traced.batch_specialized  # len(y) reads the batch size
    with pytest.raises(rs.InputError, match="specialising"):
        s(torch.randn(2, 3, 24, 24))
    with pytest.raises(rs.InputError, match="specialising"):
        s(torch.randn(5, 3, 16, 16))


def test_spatial_checks_keep_batch_size_free() -> None:
    class Checks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if x.shape[-1] % 8:
                raise ValueError("width must be divisible by 8")
            y = self.c(x)
            return y, y.mean((2, 3))

    m = Checks().eval()
    s = rs.instrument(m, torch.randn(2, 3, 16, 16))
    assert s.trace_path == "fx-concrete" and not s.traced.batch_specialized
    x5 = torch.randn(5, 3, 16, 16)
    assert torch.equal(s(x5)[1], m(x5)[1])


def test_untraceable_submodule_is_made_a_leaf(x: torch.Tensor) -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c(x)
            return y[y.sum((1, 2, 3)) > -1e9]  # data-dependent shape

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DataDependent()
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.inner(x)
            return {"a": self.head(y), "b": y.mean((1, 2, 3))}

    m = Outer().eval()
    s = rs.instrument(m, x)
    assert torch.equal(s(x)["a"], m(x)["a"])
    assert "inner" in s.traced.leaves or s.trace_path.startswith("fx")


def test_untraceable_model_names_module_and_remedy(x: torch.Tensor) -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor(float(x.sum().item() > 0)) * x

    with pytest.raises(rs.TracingError, match=r"leaf_modules=\[") as e:
        rs.instrument(Bad(), x, verify=True)
    assert "'<root>'" in str(e.value) or "Bad" in str(e.value)


def test_device_mismatch_is_an_input_error(net: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, device="meta")
    with pytest.raises(rs.InputError, match="same device"):
        rs.instrument(net, x)


def test_train_mode_graph_differs_from_eval_graph(x: torch.Tensor) -> None:
    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.c(x)
            if self.training:
                y = y * 2
            return {"a": y, "b": F.relu(y)}

    m = Drop().train()
    s = rs.instrument(m, x)
    assert s.traced.dual
    assert torch.equal(s(x)["a"], m(x)["a"])
    s.eval()
    m.eval()
    assert torch.equal(s(x)["a"], m(x)["a"])
