"""Coverage on real models (a CI-bounded sample of ``benchmarks/coverage.py``) and error paths.

Every model is built with random weights (nothing is downloaded) and instrumented on CPU: the
Surgeon's eval-mode outputs must be bit-identical to the model's, the model must be left as it was,
and the topology must find the trunk the tasks share.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import routesurgeon as rs

pytestmark = pytest.mark.coverage

timm = pytest.importorskip("timm")
smp = pytest.importorskip("segmentation_models_pytorch")

# (spec, features_only, input size, extra kwargs): one or two per family, chosen so that every
# trace path and the known hard cases (same padding, input-size checks, attention caches,
# multi-resolution branches, mixed kernels, smp shape checks) are exercised.
TIMM_CASES: list[tuple[str, bool, int, dict[str, Any]]] = [
    ("resnet18", False, 64, {}),
    ("regnety_004", True, 64, {}),
    ("convnext_atto", False, 64, {}),
    ("tf_mixnet_s", True, 64, {}),
    ("mobilenetv3_small_050", True, 64, {}),
    ("ghostnet_050", False, 64, {}),
    ("dla34", True, 64, {}),
    ("hrnet_w18_small", True, 64, {}),
    ("efficientvit_b0", True, 64, {}),
    ("mobilevitv2_050", True, 64, {}),
    ("vit_tiny_patch16_224", False, 64, {"img_size": 64}),
    ("levit_128s", False, 128, {"img_size": 128}),
]
SMP_CASES = [  # (arch, encoder, input size): PAN's pyramid pooling needs 128 px
    ("Unet", "resnet18", 64),
    ("FPN", "efficientnet-b0", 64),
    ("PSPNet", "mobilenet_v2", 64),
    ("Linknet", "resnet18", 64),
    ("PAN", "resnet18", 128),
    ("Segformer", "mit_b0", 64),
]


def _equal(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_flatten(a)[0], pytree.tree_flatten(b)[0]
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def _check(built: rs.BuiltModel) -> rs.Surgeon:
    model, x = built.model.eval(), built.example_inputs
    with torch.no_grad():
        want = model(x)
    s = rs.instrument(model, x, tasks=built.tasks)
    s.eval()
    with torch.no_grad():
        assert _equal(s(x), want), f"{built.spec}: Surgeon(x) != model(x) ({s.trace_path})"
        assert _equal(model(x), want), f"{built.spec}: instrument changed the model"
    shared = s.topology.shared_layers()
    assert shared, f"{built.spec}: no shared trunk found"
    assert all(len(la.tasks) >= 2 for la in shared)
    # the trunk is shared by every task; each task reaches some layer of its own or shared ones
    assert any(la.tasks == frozenset(s.tasks) and la.kind == "conv" for la in shared) or any(
        la.tasks == frozenset(s.tasks) and la.kind == "linear" for la in shared
    )
    return s


@pytest.mark.parametrize(
    ("name", "features_only", "size", "kwargs"), TIMM_CASES,
    ids=[f"{n}-{'features' if fo else 'heads'}" for n, fo, _, _ in TIMM_CASES],
)
def test_timm_model_traces_exactly_and_shares_a_trunk(
    name: str, features_only: bool, size: int, kwargs: dict[str, Any]
) -> None:
    built = rs.build_model(f"timm:{name}", features_only=features_only, input_size=size, **kwargs)
    s = _check(built)
    assert s.tasks == built.tasks
    if not features_only:  # three heads on one pooled feature: each head is exclusive
        for t in s.tasks:
            assert [la.kind for la in s.topology.exclusive_layers(t)] == ["linear"]


@pytest.mark.parametrize(
    ("arch", "encoder", "size"), SMP_CASES, ids=[f"{a}-{e}" for a, e, _ in SMP_CASES]
)
def test_smp_model_with_aux_head_traces_exactly_and_shares_the_encoder(
    arch: str, encoder: str, size: int
) -> None:
    built = rs.build_model(f"smp:{arch}:{encoder}", aux_classes=3, input_size=size)
    s = _check(built)
    assert s.tasks == ["mask", "label"]
    shared = {la.name for la in s.topology.shared_layers()}
    assert all(name.startswith("encoder.") for name in shared), sorted(shared)[:5]
    exclusive_mask = {la.name for la in s.topology.exclusive_layers("mask")}
    assert any(n.startswith(("decoder.", "segmentation_head.")) for n in exclusive_mask)
    assert {la.name for la in s.topology.exclusive_layers("label")} <= {
        n for n, _ in built.model.named_modules() if n.startswith("classification_head")
    }


# --------------------------------------------------------------------------------------------
# Error paths and the promises instrument makes (beyond tests/test_instrument.py)
# --------------------------------------------------------------------------------------------
class _Counter(nn.Module):
    """Reads tensor data into Python and branches on it: untraceable by any fx path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().sum().item() > 0)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.count = _Counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        n = int(self.count(y).flatten()[0] > 0)  # the leaf's output still steers Python
        return y if n else -y


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.body = nn.Sequential(_Block())
        self.head_a = nn.Linear(4, 2)
        self.head_b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.body(self.stem(x)).mean((2, 3))
        if z.norm() > 0:  # data-dependent control flow in the root's own forward
            z = z * 2
        return {"a": self.head_a(z), "b": self.head_b(z)}


def test_untraceable_model_error_names_module_op_line_and_remedy() -> None:
    with pytest.raises(rs.TracingError) as info:
        rs.instrument(_Untraceable().eval(), torch.randn(2, 3, 8, 8))
    msg = str(info.value)
    # the nested offenders were made leaves; what is left is the root's own branch
    assert "module '<root>' (_Untraceable)" in msg
    assert "op 'gt'" in msg and "from 'norm" in msg  # the op whose value Python branched on
    assert "if z.norm() > 0" in msg and "test_coverage.py" in msg  # the source line
    assert "cannot be an opaque leaf" in msg and "torch.fx.wrap" in msg
    # the attempts name the nested modules that failed first and were made opaque leaves
    assert "in module 'body.0.count'" in msg and "from 'item'" in msg
    assert "in module 'body.0'" in msg and "fx-concrete+leaf" in msg


def test_unknown_task_lists_the_outputs_and_task_queries_list_the_tasks() -> None:
    built = rs.build_model("smp:Unet:resnet18", aux_classes=3, input_size=64)
    with pytest.raises(rs.TaskError, match=r"available outputs: \['out0', 'out1'\]"):
        rs.instrument(built.model, built.example_inputs, tasks=["mask"])
    s = rs.instrument(built.model, built.example_inputs, tasks=["mask", "label"])
    for query in (s.task_parameters, s.topology.task_params, s.topology.exclusive_layers):
        with pytest.raises(rs.TaskError, match=r"tasks are \['mask', 'label'\]"):
            query("depth")
    with pytest.raises(rs.TaskError, match=r"unknown task 'depth'"), s.route("depth"):
        pass


def test_single_output_real_model_is_one_task_with_nothing_shared() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    s = rs.instrument(model, x)
    assert s.tasks == ["out"]
    with torch.no_grad():
        assert torch.equal(s(x), model(x))
    layers = s.topology.layers()
    assert layers and all(la.tasks == frozenset({"out"}) for la in layers)
    assert s.topology.shared_layers() == []
    assert s.shared_parameters() == [] and s.importance_parameters() == []
    summary = s.topology.summary()["out"]
    assert summary["param_share"] == pytest.approx(1.0) and summary["shared_layers"] == 0


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "attrs": [(n, sorted(m.__dict__)) for n, m in model.named_modules()],
        "types": [(n, type(m)) for n, m in model.named_modules()],
    }


def _assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in ("modes", "params", "attrs", "types"):
        assert before[key] == after[key], key
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k  # BN running stats untouched by tracing


def test_train_mode_model_stays_in_train_mode_and_unchanged() -> None:
    built = rs.build_model("timm:efficientnet_b0", input_size=64, drop_rate=0.2,
                           drop_path_rate=0.1)
    model, x = built.model.train(), built.example_inputs
    model.backbone.conv_head.eval()  # a mixed-mode model must keep its mixture
    before = _snapshot(model)
    s = rs.instrument(model, x, tasks=built.tasks)
    _assert_same_snapshot(before, _snapshot(model))
    assert s.training and model.training and not model.backbone.conv_head.training
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    got = s(x)
    torch.manual_seed(1)
    want = reference(x)
    assert _equal(got, want)  # same dropout / drop-path draws, same batch statistics
    s.eval()
    assert not model.training  # the Surgeon's mode is the model's mode


def test_attention_caches_are_not_left_holding_proxies() -> None:
    # levit caches attention biases per device in eval mode; tracing must not leave a proxy there
    built = rs.build_model("timm:levit_128s", input_size=128, img_size=128)
    model, x = built.model.eval(), built.example_inputs
    before = _snapshot(model)
    rs.instrument(model, x, tasks=built.tasks)
    _assert_same_snapshot(before, _snapshot(model))
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches and all(not c for c in caches)
    with torch.no_grad():
        model(x)  # still callable


def test_inputs_as_tensor_tuple_list_or_dict() -> None:
    built = rs.build_model("timm:mobilenetv3_small_050", features_only=True, input_size=64)
    model, x = built.model, built.example_inputs
    with torch.no_grad():
        want = model(x)
    for example in (x, (x,), [x], {"x": x}):
        s = rs.instrument(model, example)
        with torch.no_grad():
            assert _equal(s(x), want) and _equal(s(x=x), want)
        assert len(s.tasks) == len(model.feature_info.channels())
    with pytest.raises(rs.InputError, match=r"do not fit"):
        rs.instrument(model, {"image": x})


def test_one_channel_map_broadcast_over_many_channels_is_fixed_not_crashing() -> None:
    # PAN / attention-gate pattern: a 1-channel conv output multiplies a C-channel feature map
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feat = nn.Conv2d(3, 8, 3, padding=1)
            self.att = nn.Conv2d(8, 1, 1)
            self.a = nn.Conv2d(8, 2, 1)
            self.b = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = self.feat(x)
            g = f * self.att(f).sigmoid()
            return {"a": self.a(g), "b": self.b(g.mean((2, 3)))}

    m = Gate().eval()
    x = torch.randn(2, 3, 8, 8)
    s = rs.instrument(m, x)
    with torch.no_grad():
        assert _equal(s(x), m(x))
    groups = s.channel_groups
    att = next(n for n in s.traced.eval_graph.graph.nodes if n.target == "att")
    (g,) = set(groups.labels[groups.layers[att]["out"]].tolist())
    assert groups.fixed[g] and "broadcast" in groups.reasons[g]
    assert {la.name for la in s.topology.shared_layers()} >= {"feat", "att"}


def test_forward_hooks_that_collect_features_are_traced() -> None:
    # timm's FeatureHookNet pattern: hooks store stage outputs in a dict keyed by device
    class Hooked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s1 = nn.Conv2d(3, 4, 3, padding=1)
            self.s2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
            self.store: dict[Any, dict[str, torch.Tensor]] = {}
            for name in ("s1", "s2"):
                getattr(self, name).register_forward_hook(
                    lambda m, i, o, name=name: self.store.setdefault(o.device, {}).update({name: o})
                )

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            self.s2(self.s1(x).relu())
            out = self.store.pop(x.device)
            return [out["s1"], out["s2"]]

    m = Hooked().eval()
    x = torch.randn(2, 3, 8, 8)
    s = rs.instrument(m, x)
    assert s.tasks == ["out0", "out1"] and s.trace_path == "fx-concrete"
    assert any("device = cpu" in sp for sp in s.traced.specializations)
    with torch.no_grad():
        assert _equal(s(x), m(x))
    assert m.store == {}  # nothing left behind by tracing
    assert [la.name for la in s.topology.shared_layers()] == ["s1"]
