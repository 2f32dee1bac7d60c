"""Route export: bit-exact without pruning, smaller with pruning, unions, bad input, cost report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import routesurgeon as rs
from routesurgeon.errors import ExportError, InputError, ModelChangedError, TaskError
from routesurgeon.export import masked_graph, verify_route
from routesurgeon.outputs import leaf_values
from routesurgeon.report import count_flops, count_params, render_report, route_report
from routesurgeon.routes import RouteInfo, magnitude_scores, union_mask


def full_outputs(s: rs.Surgeon) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = s.model.eval()(*s.example_inputs())
    leaves = leaf_values(out, s.outputs.names)
    return {t: leaves[o] for t, o in zip(s.outputs.tasks, s.outputs.task_outputs)}


def run(route: nn.Module, s: rs.Surgeon) -> Any:
    with torch.no_grad():
        return route(*s.example_inputs())


def random_scores(s: rs.Surgeon, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Different per-task scores (so routes differ) for every scored layer."""
    rng = np.random.default_rng(seed)
    base = magnitude_scores(s)
    return {layer: {t: rng.random(len(v)) for t, v in per.items()} for layer, per in base.items()}


# -- small net ----------------------------------------------------------------------------------


def test_keep_one_is_bit_exact_on_small_net(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    want = full_outputs(s)
    routes = s.export_routes(keep=1.0, scores="magnitude")
    assert set(routes) == set(s.tasks)
    for t, r in routes.items():
        assert torch.equal(run(r, s), want[t]), t
        info = r.meta["routesurgeon"]
        assert isinstance(info, RouteInfo) and info.tasks == (t,) and info.error == 0.0


def test_pruned_routes_are_smaller_and_match_reference(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    xs = s.example_inputs()
    full = s.export_routes(keep=1.0, scores="magnitude")
    half = s.export_routes(keep=0.5, scores="magnitude")
    for t in s.tasks:
        assert count_params(half[t]) < count_params(full[t])
        assert count_flops(half[t], xs) < count_flops(full[t], xs)
        ref = s.masked(t, keep=0.5, scores="magnitude")
        got, want = run(half[t], s), run(ref, s)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # the physically pruned conv has the route's channel count
        mask = half[t].meta["routesurgeon"].mask
        assert half[t].get_submodule("c2").out_channels == len(mask.kept["c2"])


def test_verification_rejects_a_wrong_route(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])["a"]
    other_mask = s.route_masks("a", keep=1.0, scores="magnitude")
    with pytest.raises(ExportError, match=r"differs from its masked reference"):
        verify_route(route, masked_graph(s, other_mask), s.example_inputs(), "a")


def test_union_keeps_what_any_task_keeps(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    scores = random_scores(s)
    routes = s.export_routes(keep=0.5, scores=scores)
    union = s.export_routes(keep=0.5, scores=scores, union=True)
    assert isinstance(union, torch.fx.GraphModule)
    info = union.meta["routesurgeon"]
    assert info.tasks == tuple(s.tasks) and info.mask.tasks == tuple(s.tasks)
    for layer, kept in info.mask.kept.items():
        expect = set().union(*(set(r.meta["routesurgeon"].mask.kept[layer].tolist())
                               for r in routes.values()))
        assert set(kept.tolist()) == expect, layer
    out = run(union, s)
    assert set(out) == set(s.tasks)
    ref = run(masked_graph(s, info.mask), s)
    for t in s.tasks:
        torch.testing.assert_close(out[t], ref[t], rtol=1e-5, atol=1e-6)
    # routes differ, so the union is larger than any one route and smaller than all together
    sizes = [count_params(r) for r in routes.values()]
    assert max(sizes) < count_params(union) < sum(sizes)
    # a union of one task computes exactly that task's route
    one = s.export_routes(keep=0.5, scores=scores, tasks=["b"], union=True)
    torch.testing.assert_close(run(one, s)["b"], run(routes["b"], s), rtol=0, atol=0)


def test_union_without_pruning_is_bit_exact(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    want = full_outputs(s)
    out = run(s.export_routes(keep=1.0, scores="magnitude", tasks=["a", "d"], union=True), s)
    assert set(out) == {"a", "d"}
    for t in out:
        assert torch.equal(out[t], want[t])


# -- bad input ------------------------------------------------------------------------------


def test_unknown_task(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    with pytest.raises(TaskError, match=r"zz"):
        s.route_masks("zz", scores="magnitude")
    with pytest.raises(TaskError, match=r"zz"):
        s.export_routes(tasks=["a", "zz"], scores="magnitude")
    with pytest.raises(TaskError, match=r"duplicate"):
        s.export_routes(tasks=["a", "a"], scores="magnitude", union=True)
    with pytest.raises(InputError, match=r"no task"):
        s.export_routes(tasks=[], scores="magnitude", union=True)
    with pytest.raises(TaskError):
        union_mask(s, [s.route_masks("a", scores="magnitude")] * 2)


@pytest.mark.parametrize("keep", [0.0, -0.2, 1.01, 2, None, float("nan")])
def test_keep_outside_unit_interval(net: nn.Module, x: torch.Tensor, keep: Any) -> None:
    s = rs.instrument(net, x)
    with pytest.raises(InputError, match=r"keep must be a fraction in \(0, 1\]"):
        s.export_routes(keep=keep, scores="magnitude")


def test_routes_before_any_scores_exist(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    with pytest.raises(InputError, match=r"no importance scores exist yet"):
        s.export_routes(keep=0.5)
    with pytest.raises(InputError, match=r"no importance scores exist yet"):
        s.export_routes(keep=0.5, union=True)
    with pytest.raises(InputError, match=r"unknown criterion 'bogus'; available: \['learned'"):
        s.export_routes(keep=0.5, scores="bogus")


def test_bad_custom_scores(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    scores = random_scores(s)
    scores["c2"] = {t: np.ones(3) for t in s.tasks}
    with pytest.raises(InputError, match=r"'c2'.*shape \(3,\).*16 output channels"):
        s.export_routes(scores=scores)


def test_model_changed_after_instrumenting(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    net.c2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
    with pytest.raises(ModelChangedError, match=r"instrument again"):
        s.export_routes(keep=0.5, scores="magnitude")
    with pytest.raises(ModelChangedError):
        s.export_routes(keep=0.5, scores="magnitude", union=True)


# -- cost report ----------------------------------------------------------------------------


def test_route_report(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    routes = s.export_routes(keep=0.5, scores="magnitude")
    union = s.export_routes(keep=0.5, scores="magnitude", union=True)
    rows = route_report(s, routes, union, repeats=3, warmup=1)
    by = {r["name"]: r for r in rows}
    assert list(by) == ["full", "a", "b", "d", "union"]
    assert by["full"]["params"] == count_params(net) and by["full"]["flops_frac"] == 1.0
    for t in s.tasks:
        assert by[t]["params"] == count_params(routes[t]) < by["full"]["params"]
        assert 0 < by[t]["flops"] < by["full"]["flops"]
        assert by[t]["latency_ms"] > 0
    assert by["union"]["flops"] >= max(by[t]["flops"] for t in s.tasks)
    table = render_report(rows)
    assert table.row_count == 5
    with pytest.raises(InputError, match=r"reserved"):
        route_report(s, {"full": routes["a"]})
    with pytest.raises(InputError, match=r"repeats"):
        route_report(s, routes, repeats=0)


# -- real models ----------------------------------------------------------------------------

REAL = [
    ("timm:resnet18", {}),
    ("timm:efficientnet_b0", {}),
    ("timm:convnext_atto", {}),
    ("timm:mixnet_s", {}),
    ("smp:Unet:resnet34", {"aux_classes": 4}),
    ("smp:DeepLabV3Plus:efficientnet-b0", {"aux_classes": 4}),  # functional depthwise convs
]


@pytest.mark.parametrize(("spec", "kwargs"), REAL, ids=[s for s, _ in REAL])
def test_real_model_routes(spec: str, kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    b = rs.build_model(spec, input_size=64, **kwargs)
    s = rs.instrument(b.model, b.example_inputs, tasks=b.tasks)
    xs = s.example_inputs()
    want = full_outputs(s)
    whole = s.export_routes(keep=1.0, scores="magnitude")
    for t, r in whole.items():
        assert torch.equal(run(r, s), want[t]), f"{spec} {t}: not bit-exact with keep=1"
    union_all = run(s.export_routes(keep=1.0, scores="magnitude", union=True), s)
    for t in s.tasks:
        assert torch.equal(union_all[t], want[t]), f"{spec} union {t}"
    half = s.export_routes(keep=0.5, scores="magnitude")
    for t, r in half.items():
        assert r.meta["routesurgeon"].error <= 1e-5
        p_frac = count_params(r) / count_params(whole[t])
        f_frac = count_flops(r, xs) / count_flops(whole[t], xs)
        # half the shared channels: conv cost falls roughly with kept_in * kept_out
        assert 0.1 < p_frac < 0.65, (spec, t, p_frac)
        assert 0.1 < f_frac < 0.65, (spec, t, f_frac)
