"""tv:NAME models, and outputs that exist only in training (GoogLeNet's aux logits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.errors import InputError, TracingError
from routesurgeon.outputs import output_names

pytest.importorskip("torchvision")


def _zero_first(sizes: list[int], x: torch.Tensor) -> torch.Tensor:
    sizes[0] = 0  # assigns into its list argument, like torchvision's Swin3D helper
    return x * (1 + sizes[0])


torch.fx.wrap("_zero_first")


class _Mutates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.a(_zero_first([2, 3], x)), "b": self.b(x)}


def test_wrapped_function_assigning_into_a_list_argument() -> None:
    s = rs.instrument(_Mutates(), torch.randn(2, 3, 4, 4))  # the shape recorder runs it
    assert s.tasks == ["a", "b"]


def _eager(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(output_names(model.eval()(x)))


@pytest.mark.parametrize("spec,aux,tasks", [
    ("tv:resnet18", False, ["cls", "aux", "head2"]),
    ("tv:mobilenet_v3_small", False, ["cls", "aux", "head2"]),
    ("tv:squeezenet1_1", False, ["cls", "aux", "head2"]),  # its classifier is a conv
    ("tv:deeplabv3_mobilenet_v3_large", True, ["out", "aux"]),  # aux_loss
])
def test_tv_models_trace_and_export_exactly(spec: str, aux: bool, tasks: list[str]) -> None:
    built = rs.build_model(spec, aux=aux, input_size=64)
    s = rs.instrument(built.model, built.example_inputs)
    assert s.tasks == tasks == built.tasks
    assert s.shared_parameters()  # the backbone is shared by every head
    eager = _eager(built.model, built.example_inputs)
    routes = s.export_routes(keep=1.0)
    assert sorted(routes) == sorted(tasks)
    for t, route in routes.items():
        got = route(*s.example_inputs())
        got = got if isinstance(got, torch.Tensor) else next(iter(dict(output_names(got)).values()))
        assert torch.allclose(got, eager[t], atol=1e-5), t


def test_googlenet_training_only_aux_logits_are_tasks() -> None:
    built = rs.build_model("tv:googlenet", aux=True)
    model, x = built.model, built.example_inputs
    s = rs.instrument(model, x)
    assert s.tasks == ["logits", "aux_logits2", "aux_logits1"]
    assert s.traced.training_only_outputs == ["aux_logits2", "aux_logits1"]
    # the aux heads share the trunk with the logits: inception4a is reached by all three tasks
    tasks_of = s.param_tasks()
    assert tasks_of["inception4a.branch1.conv.weight"] == frozenset(s.tasks)
    assert tasks_of["aux1.fc2.weight"] == frozenset(["aux_logits1"])
    assert tasks_of["fc.weight"] == frozenset(["logits"])
    # eval runs the eval graph: one tensor, the model's own eval output
    s.eval()
    with torch.no_grad():
        out = s(x)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, model.eval()(x))
    # train a few steps: every head's parameters move
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(s.model_parameters(), lr=0.1)
    tr = rs.Trainer(s, opt, method="equal", progress=False)
    y = torch.tensor([1, 3])
    losses = {t: F.cross_entropy for t in s.tasks}
    for _ in range(2):
        assert tr.train_step(x, {t: y for t in s.tasks}, losses) is not None
    for name in ("fc.weight", "aux1.fc2.weight", "aux2.fc2.weight", "conv1.conv.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name
    # evaluation scores every task, the training-only ones too (their heads run in eval mode)
    acc = {t: (lambda o, y: float((o.argmax(1) == y).float().mean())) for t in s.tasks}
    metrics = tr.evaluate([(x, {t: y for t in s.tasks})], acc)
    assert sorted(metrics) == sorted(s.tasks)
    # one exact route per task; the logits route is the eval model, an aux route holds no fc
    s.eval()
    routes = s.export_routes(keep=1.0)
    assert sorted(routes) == sorted(s.tasks)
    with torch.no_grad():
        assert torch.allclose(routes["logits"](x), model.eval()(x), atol=1e-5)
        aux1 = routes["aux_logits1"](x)
    assert aux1.shape == (2, 10)
    n = {t: sum(p.numel() for p in r.parameters()) for t, r in routes.items()}
    assert n["aux_logits1"] < n["aux_logits2"] < sum(p.numel() for p in model.parameters())


class _AuxNet(nn.Module):
    """A trunk, a main head and an aux head computed only in training (with functional dropout
    that reads self.training, like GoogLeNet's)."""

    def __init__(self, reuse_main: bool = True) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.main = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
        self.reuse_main = reuse_main

    def forward(self, x: torch.Tensor) -> object:
        z = self.trunk(x)
        y = self.main(z)
        if self.training:
            a = self.aux(F.dropout(z, 0.5, training=self.training))
            return {"main": y if self.reuse_main else y * 2, "aux": a}
        return y


def test_training_only_output_of_a_handwritten_net() -> None:
    net = _AuxNet()
    x = torch.randn(2, 3, 8, 8)
    s = rs.instrument(net, x)
    assert net.training  # instrumenting left the model's mode alone
    assert s.tasks == ["main", "aux"] and s.traced.training_only_outputs == ["aux"]
    assert s.param_tasks()["trunk.0.weight"] == frozenset(["main", "aux"])
    routes = s.export_routes(keep=1.0)
    with torch.no_grad():  # the aux route runs its dropout in eval mode: deterministic
        assert torch.equal(routes["aux"](x), routes["aux"](x))
        assert torch.allclose(routes["main"](x), net.eval()(x), atol=1e-6)


def test_training_only_outputs_whose_eval_output_is_not_among_them_are_refused() -> None:
    with pytest.raises(TracingError, match=r"training-only outputs.*cannot tell which task"):
        rs.instrument(_AuxNet(reuse_main=False), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("spec,kwargs,match", [
    ("tv:resnet_18", {}, "torchvision has no model 'resnet_18'"),
    ("tv:resnet18", {"aux": True}, "has no auxiliary outputs"),
    ("tv:lraspp_mobilenet_v3_large", {"aux": True}, "has no auxiliary head"),
    ("tv:resnet18:heads", {}, r"the parts are 'features' \(classification.*'heads' \(detection"),
    ("tv:retinanet_resnet50_fpn:features", {}, r"the parts are 'features'"),
    ("tv:resnet18:trunk", {}, r"tv:resnet18:trunk: the parts are"),
])
def test_tv_spec_errors(spec: str, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        rs.build_model(spec, **kwargs)


def test_cli_inspect_tv_aux_and_detection_heads(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from routesurgeon.cli import main

    assert main(["inspect", "tv:googlenet", "--aux", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tasks"] == ["logits", "aux_logits2", "aux_logits1"]
    assert data["per_task"]["aux_logits1"]["params"] < data["per_task"]["logits"]["params"]
    assert main(["inspect", "tv:fasterrcnn_mobilenet_v3_large_320_fpn:heads", "--input-size",
                 "64", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ["objectness", "rpn_bbox_deltas"]


def _add_into(x: torch.Tensor, y: torch.Tensor) -> None:
    x.add_(y)  # mutates its argument; returns nothing (torchvision MViT's _add_shortcut)


torch.fx.wrap("_add_into")


class _SideEffect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.a(x)
        _add_into(y, x)
        return {"a": y.mean((2, 3)), "b": self.b(y)}


def test_wrapped_function_mutating_its_argument_is_refused() -> None:
    with pytest.raises(TracingError, match=r"_add_into.*returns a value nothing uses.*mutating"):
        rs.instrument(_SideEffect(), torch.randn(2, 3, 4, 4))


class _Unpacks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.shape[:2]  # tuple unpacking of a proxy: fx reads the caller's bytecode
        return x.reshape(a, b, -1).sum(-1)


def test_other_fx_tracers_still_unpack_proxies_after_import() -> None:
    # routesurgeon patches fx.Proxy.__iter__ (with a disassembly cache); plain fx must still work
    gm = torch.fx.symbolic_trace(_Unpacks())
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(gm(x), _Unpacks()(x))
    for _ in range(2):  # a loop over a proxy is not an unpacking: fx's own error
        with pytest.raises(torch.fx.proxy.TraceError):
            torch.fx.symbolic_trace(_Loops())


class _Loops(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(v for v in x)  # type: ignore[return-value]


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_tv_features_part_is_a_four_stage_multi_output_model(name: str) -> None:
    built = rs.build_model(f"tv:{name}:features", input_size=64)
    assert built.tasks == ["stage1", "stage2", "stage3", "stage4"]
    s = rs.instrument(built.model, built.example_inputs)
    assert s.tasks == built.tasks
    eager = _eager(built.model, built.example_inputs)
    shapes = [eager[t].shape[-1] for t in s.tasks]
    assert shapes == sorted(shapes, reverse=True) and shapes[0] > shapes[-1]  # deeper, smaller
    routes = s.export_routes(keep=1.0)
    n = {t: sum(p.numel() for p in r.parameters()) for t, r in routes.items()}
    assert n["stage1"] < n["stage2"] < n["stage3"] < n["stage4"]  # a stage's route stops there
    with torch.no_grad():
        for t, route in routes.items():
            assert torch.allclose(route(built.example_inputs), eager[t], atol=1e-5), t


def test_tv_unknown_part_is_refused_with_the_parts_named() -> None:
    with pytest.raises(InputError, match=r"'features'.*'heads'"):
        rs.build_model("tv:resnet18:bogus")
    with pytest.raises(InputError, match="no auxiliary outputs"):
        rs.build_model("tv:googlenet:features", aux=True)
