"""Selection criteria, global/budget selection, BN recalibration and the torch-pruning anchor."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import routesurgeon as rs
from routesurgeon.budgets import cost_model
from routesurgeon.criteria import CRITERIA, DATA_CRITERIA, criterion_scores
from routesurgeon.errors import InputError, TaskError
from routesurgeon.report import count_flops, count_params
from routesurgeon.routes import magnitude_scores
from routesurgeon.tp_anchor import task_copy, torch_pruning_route
from tests.conftest import TwoHeadNet
from tests.toydata import LOSSES, batches


@pytest.fixture(scope="module")
def trained() -> rs.Surgeon:
    torch.manual_seed(0)
    s = rs.instrument(TwoHeadNet().eval(), torch.randn(2, 3, 16, 16))
    opt = torch.optim.Adam(s.model_parameters(), lr=1e-2)
    rs.Trainer(s, opt, method="drmgf-step", progress=False).fit_epoch(batches(32, 8), LOSSES)
    return s.eval()


def _scores(s: rs.Surgeon, name: str) -> Any:
    return criterion_scores(s, name, batches(32, 16), LOSSES, batches=2)


def _unpruned(s: rs.Surgeon, task: str) -> np.ndarray:
    return s.route_masks(task, keep=1.0).pruned


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_exports_exact_routes_within_budget(trained: rs.Surgeon, name: str,
                                                            x: torch.Tensor) -> None:
    scores = _scores(trained, name)
    cm = cost_model(trained)
    for select in ("layer", "global"):
        routes = trained.export_routes(scores=scores, select=select, budget_flops=0.5)
        for t, route in routes.items():
            info = route.meta["routesurgeon"]
            assert info.error <= 1e-5 and info.budget == ("flops", 0.5) and info.select == select
            assert info.scores == (name if name != "learned" else "learned")
            flops = count_flops(route, (x[:1],))
            assert flops == cm.cost("flops", info.mask.pruned, (t,))  # the cost model is exact
            assert count_params(route) == cm.cost("params", info.mask.pruned, (t,))
            full = cm.cost("flops", _unpruned(trained, t), (t,))
            assert 0.3 * full < flops <= 0.5 * full


def test_budget_params_and_floor(trained: rs.Surgeon) -> None:
    cm = cost_model(trained)
    r = trained.export_routes(scores="group-magnitude", budget_params=0.4, tasks=["a"])["a"]
    full = cm.cost("params", _unpruned(trained, "a"), ("a",))
    assert count_params(r) <= 0.4 * full
    with pytest.raises(InputError, match=r"budget_flops=0.01 asks for .* task 'a''s route cannot "
                                         r"cost less than .*use budget_flops >= 0\.\d+"):
        trained.route_masks("a", scores="magnitude", budget_flops=0.01)
    with pytest.raises(InputError, match="one of budget_flops and budget_params"):
        trained.route_masks("a", scores="magnitude", budget_flops=0.5, budget_params=0.5)
    with pytest.raises(InputError, match=r"budget_flops must be a fraction in \(0, 1\]"):
        trained.route_masks("a", scores="magnitude", budget_flops=1.5)
    with pytest.raises(InputError, match="unknown select 'best'; use one of"):
        trained.route_masks("a", scores="magnitude", select="best")


def test_unknown_and_data_criteria_errors(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    with pytest.raises(InputError, match=r"unknown criterion 'l1'; available: \['learned', "
                                         r"'raw-importance', 'magnitude'"):
        s.route_masks("a", scores="l1")
    for name in DATA_CRITERIA:
        with pytest.raises(InputError, match=rf"{name!r} needs batches and task losses"):
            s.route_masks("a", scores=name)
    with pytest.raises(InputError, match="reads learned importance"):
        s.route_masks("a", scores="raw-importance")
    with pytest.raises(TaskError, match=r"no loss for tasks \['d'\]"):
        criterion_scores(s, "taylor", batches(), {"a": LOSSES["a"], "b": LOSSES["b"]})


def test_data_criteria_leave_the_model_alone(net: nn.Module, x: torch.Tensor) -> None:
    net.train()
    s = rs.instrument(net, x)
    state = copy.deepcopy(net.state_dict())
    for name in DATA_CRITERIA:
        _scores(s, name)
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_taylor_scores_a_dead_filter_zero(net: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():  # c1's filter 3 outputs zeros: its first-order Taylor term is 0
        net.c1.weight[3] = 0
        net.c1.bias[3] = 0
    s = rs.instrument(net, x)
    sc = _scores(s, "taylor")
    groups = s.channel_groups
    node = next(n for n in groups.layers if n.target == "c1")
    labels = groups.labels[groups.layers[node]["out"]]
    for t in ("a", "b"):
        v = sc.per_task[t][labels]
        assert v[3] == 0 and (np.delete(v, 3) > 0).all()


def test_disparse_keeps_a_shared_group_if_any_task_keeps_it(trained: rs.Surgeon) -> None:
    snip, dis = _scores(trained, "snip"), _scores(trained, "disparse")
    kept = {t: ~trained.route_masks(t, keep=0.5, scores=snip).pruned for t in trained.tasks}
    for t in trained.tasks:
        got = ~trained.route_masks(t, keep=0.5, scores=dis).pruned
        reach = ~_unpruned(trained, t)
        for u in trained.tasks:
            assert not (kept[u] & reach & ~got).any()  # every task's kept groups stay
        assert got.sum() >= kept[t].sum()


def test_global_selection_ignores_a_layer_scale(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    table = magnitude_scores(s)
    scaled = {k: ({t: v * 1000 for t, v in per.items()} if k == "c1" else per)
              for k, per in table.items()}
    for keep in (0.3, 0.6):
        a = s.route_masks("a", keep=keep, scores=table, select="global").pruned
        b = s.route_masks("a", keep=keep, scores=scaled, select="global").pruned
        assert np.array_equal(a, b)


def test_recalibrate_route_statistics_not_the_full_model(net: nn.Module,
                                                         x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    state = copy.deepcopy(net.state_dict())
    routes = s.export_routes(keep=0.5, scores="magnitude")
    route = routes["a"]
    data = batches(64, 16)
    rs.recalibrate(route, data, batches=4)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert route.meta["routesurgeon"].recalibrated == 4 and not route.training
    with torch.no_grad():  # b1's statistics: the mean and variance of c1's sliced outputs
        y = torch.cat([route.c1(xb) for xb, _ in data])
    torch.testing.assert_close(route.b1.running_mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(route.b1.running_var, y.var((0, 2, 3)), rtol=1e-2, atol=1e-4)
    assert route.b1.momentum == net.b1.momentum
    other = routes["b"]  # untouched by a's recalibration
    assert torch.equal(other.b1.running_mean, net.b1.running_mean[other.meta_route.kept["c1"]])
    r = s.export_routes(keep=0.5, scores="magnitude", calibration=data, calibration_batches=2)
    # calibration batches re-fit the cut layers first (the default), then BN
    assert (r["d"].meta["routesurgeon"].reconstructed, r["d"].meta["routesurgeon"].recalibrated
            ) == (2, 2)
    r = s.export_routes(keep=0.5, scores="magnitude", calibration=data, calibration_batches=2,
                        reconstruct=False)  # BN statistics alone
    assert (r["d"].meta["routesurgeon"].reconstructed, r["d"].meta["routesurgeon"].recalibrated
            ) == (0, 2)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_recalibrate_bad_batches(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])["a"]
    before = route.b1.running_mean.clone()
    bn = route.b1
    with pytest.raises(InputError, match=r"shapes \[\(4, 3, 8, 8\)\].*takes \[\('N', 3, 16, 16\)"):
        rs.recalibrate(route, [torch.randn(4, 3, 8, 8)])
    assert route.b1 is bn and torch.equal(route.b1.running_mean, before)
    with pytest.raises(InputError, match="yielded no batch"):
        rs.recalibrate(route, [])
    with pytest.raises(InputError, match="batches must be a positive int"):
        rs.recalibrate(route, [x], batches=0)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_torch_pruning_anchor(net: nn.Module, x: torch.Tensor, importance: str) -> None:
    s = rs.instrument(net, x)
    state = copy.deepcopy(net.state_dict())
    copy_a = task_copy(s, "a")
    assert not {p.data_ptr() for p in copy_a.parameters()} & {
        p.data_ptr() for p in net.parameters()}
    full = count_flops(copy_a, (x[:1],))
    r = torch_pruning_route(s, "a", 0.6, importance, batches(), LOSSES["a"], steps=12)
    flops = count_flops(r, (x[:1],))
    assert flops <= 0.6 * full and flops == pytest.approx(r.rs_flops_fraction * full)
    assert r.c2.out_channels < net.c2.out_channels and r.ha.out_features == 5
    assert r(x).shape == (2, 5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


def test_default_criterion_is_the_learned_importance_magnitude(trained: rs.Surgeon) -> None:
    from routesurgeon.criteria import DEFAULT_CRITERION

    assert DEFAULT_CRITERION == "raw-importance"
    for t in trained.tasks:
        default = trained.route_masks(t, keep=0.5).pruned
        assert np.array_equal(default, trained.route_masks(t, keep=0.5,
                                                           scores="raw-importance").pruned)
    route = trained.export_routes(keep=0.5, tasks=["a"])["a"]
    assert route.meta["routesurgeon"].scores == "raw-importance"


def test_export_routes_computes_a_data_criterion_from_calibration(trained: rs.Surgeon) -> None:
    calib = batches(32, 16)
    routes = trained.export_routes(scores="taylor", budget_flops=0.5, calibration=calib,
                                   losses=LOSSES, score_batches=2, reconstruct=False)
    by_hand = criterion_scores(trained, "taylor", calib, LOSSES, batches=2)
    for t, route in routes.items():
        info = route.meta["routesurgeon"]
        assert info.scores == "taylor" and info.error <= 1e-5
        want = trained.route_masks(t, scores=by_hand, budget_flops=0.5).pruned
        assert np.array_equal(info.mask.pruned, want)
    with pytest.raises(InputError, match=r"computed from data: pass calibration=.* and losses="):
        trained.export_routes(scores="snip", budget_flops=0.5, calibration=calib)
    with pytest.raises(InputError, match="scores here are already given"):
        trained.export_routes(scores=by_hand, budget_flops=0.5, calibration=calib, losses=LOSSES)


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_a_torch_pruning_selection_exports_as_a_verified_route(trained: rs.Surgeon,
                                                                importance: str) -> None:
    from routesurgeon.export import prune_graph
    from routesurgeon.tp_anchor import mask_of_copy

    calib = batches(32, 8)
    routes = trained.export_routes(scores=f"tp-{importance}", budget_flops=0.5,
                                   calibration=calib, losses=LOSSES, tp_steps=20,
                                   calibration_batches=2)  # re-fitted, as recommended
    x = torch.randn(4, 3, 16, 16)
    for t, route in routes.items():
        info = route.meta["routesurgeon"]
        assert info.scores == f"tp-{importance}" and info.error <= 1e-5
        assert info.budget == ("flops", 0.5)
        tp_copy = torch_pruning_route(trained, t, 0.5, importance, calib, LOSSES[t], steps=20)
        assert np.array_equal(info.mask.pruned, mask_of_copy(trained, t, tp_copy).pruned)
        assert count_params(route) == count_params(tp_copy)
        with torch.no_grad():  # the mask's route computes exactly what torch-pruning's copy does
            assert torch.allclose(prune_graph(trained, info.mask)(x), tp_copy(x), atol=1e-6)


def test_torch_pruning_selection_errors(trained: rs.Surgeon, net: nn.Module,
                                        x: torch.Tensor) -> None:
    with pytest.raises(InputError, match="prunes to a FLOPs budget: pass budget_flops="):
        trained.export_routes(scores="tp-magnitude", keep=0.5)
    with pytest.raises(InputError, match=r"'tp-taylor' needs calibration=.*losses="):
        trained.export_routes(scores="tp-taylor", budget_flops=0.5)
    with pytest.raises(InputError, match="selects a route's channels with torch-pruning"):
        trained.route_masks("a", scores="tp-taylor")
    from routesurgeon.tp_anchor import mask_of_copy

    s = rs.instrument(net, x)
    tampered = torch_pruning_route(s, "a", 0.6, "magnitude", steps=12)
    with torch.no_grad():
        tampered.c2.weight.mul_(1.5)  # trained after pruning: no longer a slice of the model
    with pytest.raises(InputError, match="is not an exact slice"):
        mask_of_copy(s, "a", tampered)
