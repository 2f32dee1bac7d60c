"""rs.reconstruct: least-squares re-fitting of a route's layers whose inputs were cut."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.errors import InputError


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.ha, self.hb = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.relu(self.bn(self.c2(F.relu(self.c1(x)))))
        p = z.mean((2, 3))
        return {"a": self.ha(p), "b": self.hb(p)}


def _redundant_net() -> _Net:
    """c1's filters 4-7 are half of filters 0-3: what they carry is a function of the kept ones,
    so a least-squares re-fit of c2 on filters 0-3 reproduces the full c2 exactly."""
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.c1.weight[4:] = 0.5 * net.c1.weight[:4]
        net.c1.bias[4:] = 0.5 * net.c1.bias[:4]
    return net.eval()


def _batches(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


def _out_of(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    got = []
    h = model.get_submodule(path).register_forward_hook(lambda m, a, o: got.append(o))
    with torch.no_grad():
        model(x)
    h.remove()
    return got[0]


def test_a_refit_layer_reproduces_the_full_model_when_the_cut_inputs_are_redundant() -> None:
    net = _redundant_net()
    s = rs.instrument(net, torch.randn(2, 3, 8, 8))
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])["a"]
    mask = route.meta["routesurgeon"].mask
    assert list(mask.kept["c1"]) == [0, 1, 2, 3]  # the half-norm copies go
    kept_c2 = torch.as_tensor(mask.kept["c2"])
    x = _batches(1, seed=9)[0]  # held out
    full_c2 = _out_of(net, "c2", x)[:, kept_c2]
    before = (_out_of(route, "c2", x) - full_c2).abs().max()
    assert before > 0.05  # the exported route lost what filters 4-7 carried
    rs.reconstruct(route, s, _batches(), batches=4, ridge=0.0, recalibrate_after=False)
    after = (_out_of(route, "c2", x) - full_c2).abs().max()
    assert after < 1e-4 * full_c2.abs().max()
    assert route.meta["routesurgeon"].reconstructed == 4
    assert route.meta["routesurgeon"].recalibrated == 0


def test_reconstruction_brings_a_route_closer_to_the_full_model_and_changes_nothing_else() -> None:
    torch.manual_seed(3)
    net = _Net().eval()
    x0 = torch.randn(2, 3, 8, 8)
    s = rs.instrument(net, x0)
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    routes = s.export_routes(keep=0.5, scores="magnitude")
    other = routes["b"](x0).detach().clone()
    held = _batches(2, seed=5)
    recal = rs.recalibrate(copy.deepcopy(routes["a"]), _batches(8), batches=8)
    with torch.no_grad():
        want = torch.cat([net(x)["a"] for x in held])
        err_exported = (torch.cat([routes["a"](x) for x in held]) - want).pow(2).mean()
        err_recal = (torch.cat([recal(x) for x in held]) - want).pow(2).mean()
        rs.reconstruct(routes["a"], s, _batches(8), batches=8)  # then recalibrates
        err_fitted = (torch.cat([routes["a"](x) for x in held]) - want).pow(2).mean()
    assert err_fitted < 0.8 * min(err_exported, err_recal)
    assert routes["a"].meta["routesurgeon"].recalibrated == 8
    for k, v in net.state_dict().items():  # the full model and the other route never change
        assert torch.equal(v, before_state[k]), k
    assert torch.equal(routes["b"](x0), other)
    assert torch.equal(s(x0)["a"], net(x0)["a"])


def test_export_routes_reconstruct_option() -> None:
    net = _redundant_net()
    s = rs.instrument(net, torch.randn(2, 3, 8, 8))
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"], calibration=_batches(),
                            calibration_batches=3, reconstruct=True)["a"]
    info = route.meta["routesurgeon"]
    assert (info.reconstructed, info.recalibrated) == (3, 3)
    with pytest.raises(InputError, match="calibration="):
        s.export_routes(keep=0.5, tasks=["a"], scores="magnitude", reconstruct=True)


def test_reconstruct_bad_input() -> None:
    net = _redundant_net()
    s = rs.instrument(net, torch.randn(2, 3, 8, 8))
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])["a"]
    with pytest.raises(InputError, match=r"route returned by Surgeon\.export_routes"):
        rs.reconstruct(net, s, _batches())
    with pytest.raises(InputError, match="batches must be a positive int"):
        rs.reconstruct(route, s, _batches(), batches=0)
    with pytest.raises(InputError, match="shapes"):
        rs.reconstruct(route, s, [torch.randn(4, 5, 8, 8)])
    with pytest.raises(InputError, match="yielded no batch"):
        rs.reconstruct(route, s, [])
    wide = _Net()
    wide.c2, wide.bn = nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10)
    wide.ha, wide.hb = nn.Linear(10, 4), nn.Linear(10, 4)
    other = rs.instrument(wide.eval(), torch.randn(2, 3, 8, 8))
    other_route = other.export_routes(keep=0.5, scores="magnitude", tasks=["a"])["a"]
    with pytest.raises(InputError, match="pass the surgeon the route was exported from"):
        rs.reconstruct(other_route, s, _batches())


def test_kept_channels_are_read_off_an_exact_weight_slice() -> None:
    from routesurgeon.reconstruct import _slice_of

    torch.manual_seed(0)
    big = torch.randn(6, 5, 3, 3)
    keep_in, keep_out = _slice_of(big[[1, 2, 4]][:, [0, 3]], big, "c")
    assert list(keep_out) == [1, 2, 4] and list(keep_in) == [0, 3]
    lin = torch.randn(7, 9)
    keep_in, keep_out = _slice_of(lin[[0, 6]][:, [2, 5, 8]], lin, "fc")
    assert list(keep_out) == [0, 6] and list(keep_in) == [2, 5, 8]
    # many equal values (low-precision pretrained weights repeat): still an exact, ordered slice
    coarse = (torch.randn(40, 16) * 8).round()
    small = coarse[[3, 8, 9, 20, 31]][:, [0, 2, 3, 5, 6, 8, 9, 11, 13, 15]]
    keep_in, keep_out = _slice_of(small, coarse, "q")
    assert torch.equal(coarse[torch.as_tensor(keep_out)][:, torch.as_tensor(keep_in)], small)
    trained = big[[1, 2, 4]][:, [0, 3]] + 1e-3  # changed after pruning: not a slice any more
    with pytest.raises(InputError, match=r"layer 'c'.*not an exact slice"):
        _slice_of(trained, big, "c")
    with pytest.raises(InputError, match=r"not an exact slice.*shapes"):
        _slice_of(big, big[:3], "c")


def test_a_torch_pruning_copy_is_reconstructed_from_its_weights() -> None:
    from routesurgeon.tp_anchor import torch_pruning_route

    net = _redundant_net()
    s = rs.instrument(net, torch.randn(2, 3, 8, 8))
    before_state = {k: v.clone() for k, v in net.state_dict().items()}
    tp_copy = torch_pruning_route(s, "a", 0.6, "magnitude", steps=20)
    assert "routesurgeon" not in tp_copy.meta  # the unpruned copy's record no longer holds
    assert tp_copy.c1.out_channels < 8
    held = _batches(2, seed=5)
    with torch.no_grad():
        want = torch.cat([net(x)["a"] for x in held])
        err_before = (torch.cat([tp_copy(x) for x in held]) - want).pow(2).mean()
        # the full model's BN statistics are its defaults here: compare the re-fit alone
        rs.reconstruct(tp_copy, s, _batches(8), batches=8, ridge=0.0, recalibrate_after=False)
        err_after = (torch.cat([tp_copy(x) for x in held]) - want).pow(2).mean()
    assert tp_copy.rs_reconstructed == 8
    assert err_before > 1e-5 and err_after < 0.1 * err_before
    for k, v in net.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    tampered = torch_pruning_route(s, "a", 0.6, "magnitude", steps=20)
    with torch.no_grad():
        tampered.c2.weight.add_(0.01)
    with pytest.raises(InputError, match=r"layer 'c2'.*not an exact slice"):
        rs.reconstruct(tampered, s, _batches())


def test_stopping_each_capture_after_its_layer_fits_the_same_weights(monkeypatch) -> None:
    """The forwards that read a layer's input / output stop right after that layer; the re-fit
    must be the one a full forward gives, and the rest of the network must really not run."""
    import importlib

    rc = importlib.import_module("routesurgeon.reconstruct")  # the package exports the function

    net = _Net()
    s = rs.instrument(net, torch.randn(2, 3, 8, 8))
    route = s.export_routes(keep=0.5, scores="magnitude", tasks=["a"])["a"]
    heads: list[int] = []  # the other task's head, after every layer re-fitted (c2, ha)
    s.traced.eval_graph.get_submodule("hb").register_forward_hook(lambda *_: heads.append(1))
    early = rs.reconstruct(copy.deepcopy(route), s, _batches(), batches=4,
                           recalibrate_after=False)
    assert not heads  # no capture ran the full model past its layer
    monkeypatch.setattr(rc, "_called_once", lambda *_: set())
    whole = rs.reconstruct(copy.deepcopy(route), s, _batches(), batches=4,
                           recalibrate_after=False)
    assert heads  # the whole forward runs the heads
    for (name, a), (_, b) in zip(early.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name
