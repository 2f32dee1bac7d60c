"""Trainer: end-to-end training with the DR-MGF methods, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toydata import LOSSES, batches

import routesurgeon as rs
from routesurgeon.methods.registry import available_methods
from routesurgeon.trainer import Trainer


@pytest.mark.parametrize("method", ["drmgf", "drmgf-step"])
def test_trains_end_to_end_and_importance_diverges(net: nn.Module, x: torch.Tensor,
                                                   method: str) -> None:
    s = rs.instrument(net.train(), x)
    opt = torch.optim.Adam(s.model_parameters(), lr=1e-2)
    tr = Trainer(s, opt, method=method, progress=False)
    data = batches()
    first = tr.fit_epoch(data, LOSSES)
    for _ in range(2):
        last = tr.fit_epoch(data, LOSSES)
    assert sum(last["losses"].values()) < sum(first["losses"].values())
    assert s.route_scores() is not None
    imp = s.importance()["c2"]
    assert not torch.allclose(imp["a"], imp["d"], atol=1e-3)
    assert len(tr.history) == 3 and "importance" in tr.history[-1]
    routes = s.export_routes(keep=0.5)  # learned scores drive the routes
    assert set(routes) == {"a", "b", "d"}


def test_drmgf_counts_passes(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.01), method="drmgf",
                 progress=False, config={"cycle_steps": 2})
    rec = tr.fit_epoch(batches(), LOSSES)
    assert rec["passes"] == len(s.tasks) + 1


def test_unknown_method_lists_available(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    with pytest.raises(ValueError, match=r"available methods: .*drmgf"):
        Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), method="magic")
    assert {"drmgf", "drmgf-step"} <= set(available_methods())


def test_optimizer_must_hold_model_parameters(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net, x)
    with pytest.raises(ValueError, match="does not hold"):
        Trainer(s, torch.optim.SGD(net.c1.parameters(), lr=0.1))


def test_bad_losses_get_precise_errors(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    tr = Trainer(s, torch.optim.SGD(s.model_parameters(), lr=0.1), progress=False)
    out = tr.task_outputs(tr.forward(x))
    good = {t: v.float().pow(2).mean() for t, v in out.items()}
    with pytest.raises(rs.LossError, match=r"missing for tasks \['d'\]"):
        tr.backward({"a": good["a"], "b": good["b"]})
    with pytest.raises(rs.LossError, match=r"unknown tasks \['z'\]"):
        tr.backward({**good, "z": good["a"]})
    with pytest.raises(rs.LossError, match="scalar"):
        tr.backward({**good, "a": out["a"].pow(2)})
    with pytest.raises(rs.LossError, match="missing"):
        tr.fit_epoch(batches(), {"a": F.cross_entropy})


def test_nonfinite_losses_are_skipped_then_stop(net: nn.Module, x: torch.Tensor) -> None:
    s = rs.instrument(net.train(), x)
    opt = torch.optim.SGD(s.model_parameters(), lr=0.1)
    tr = Trainer(s, opt, method="drmgf-step", max_nonfinite=3, progress=False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    nan_losses = {**LOSSES, "b": lambda o, y: torch.tensor(math.nan)}
    for _ in range(2):
        assert tr.train_step(x[:2], {"a": torch.tensor([0, 1]), "b": torch.tensor([0, 1]),
                                     "d": torch.zeros(2, 1, 8, 8)}, nan_losses) is None
    assert tr.skipped == 2
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n  # nothing reached the weights
    with pytest.raises(rs.LossError, match=r"consecutive steps skipped.*'b'"):
        tr.train_step(x[:2], {"a": torch.tensor([0, 1]), "b": torch.tensor([0, 1]),
                              "d": torch.zeros(2, 1, 8, 8)}, nan_losses)
