"""Layers whose weight is not laid out ``(out, in, ...)``: scores, routes and exports.

Transposed convolutions hold ``(in, out/groups, ...)``; the magnitude scores, the channel rules and
the export must read their output channels from the right axis. Also: ``keep=1.0`` needs no
scores, a bad score table is reported for a task that reaches the layer, and shape assertions on
layers a task does not reach do not keep them in its route.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.routes import magnitude_scores


class UncommonLayers(nn.Module):
    """Channel shuffle, grouped conv, einsum, torch.where, ConvTranspose2d, pixel_shuffle and
    interpolate; ``up`` (ConvTranspose2d 16 -> 8) is reached by ``seg`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.proj = nn.Parameter(torch.randn(16, 16) * 0.1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.seg = nn.Conv2d(2, 3, 1)
        self.cls = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        x = self.gconv(x)
        x = torch.einsum("bchw,dc->bdhw", x, self.proj)
        x = torch.where(x > 0, x, 0.1 * x)
        y = F.pixel_shuffle(self.up(x), 2)
        y = F.interpolate(self.seg(y), scale_factor=0.5, mode="bilinear", align_corners=False)
        return {"cls": self.cls(x.mean((2, 3))), "seg": y}


class SharedTransposed(nn.Module):
    """A trunk ending in transposed convs both tasks share: plain, grouped, depthwise and
    functional (grouped) ones."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2, groups=4)
        self.dw = nn.ConvTranspose2d(8, 16, 3, padding=1, groups=8)  # depthwise x2
        self.plain = nn.ConvTranspose2d(16, 12, 1)
        self.fw = nn.Parameter(torch.randn(12, 3, 1, 1))  # F.conv_transpose2d, groups=3
        self.fb = nn.Parameter(torch.randn(9))
        self.a = nn.Conv2d(9, 2, 1)
        self.b = nn.Conv2d(9, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.stem(x))
        x = F.relu(self.dw(F.relu(self.up(x))))
        x = F.relu(self.plain(x))
        x = F.relu(F.conv_transpose2d(x, self.fw, self.fb, groups=3))
        return {"a": self.a(x), "b": self.b(x)}


def _surgeon(model: nn.Module, size: int = 8) -> rs.Surgeon:
    torch.manual_seed(0)
    for p in model.parameters():  # spread the filter norms so that magnitude ranks them
        with torch.no_grad():
            p.mul_(torch.rand_like(p) * 2)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return rs.instrument(model.eval(), x)


def _outputs(s: rs.Surgeon) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out: Any = s.model(*s.example_inputs())
    return dict(out)


def test_uncommon_layers_export_with_magnitude_scores() -> None:
    torch.manual_seed(0)
    s = _surgeon(UncommonLayers())
    want = _outputs(s)
    assert {la.name: la for la in s.topology.layers()}["up"].tasks == frozenset({"seg"})
    for keep in (1.0, 0.5):
        routes = s.export_routes(keep=keep, scores="magnitude")
        assert set(routes) == {"cls", "seg"}
        if keep == 1.0:
            for t, r in routes.items():
                with torch.no_grad():
                    assert torch.allclose(r(*s.example_inputs()), want[t], rtol=1e-5, atol=1e-6)
    # the cls route does not run the layers only seg reaches
    cls_modules = {n.target for n in routes["cls"].graph.nodes if n.op == "call_module"}
    assert "up" not in cls_modules and "seg" not in cls_modules


def _independent_out_norms(w: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """Each output channel's weight norm, one channel at a time from the layer's definition."""
    if not transposed:
        return torch.stack([w[o].norm() for o in range(w.shape[0])])
    per_in, per_out = w.shape[0] // groups, w.shape[1]
    norms = []
    for o in range(groups * per_out):
        j, k = divmod(o, per_out)
        norms.append(w[j * per_in:(j + 1) * per_in, k].norm())
    return torch.stack(norms)


def test_magnitude_scores_read_each_layout() -> None:
    s = _surgeon(SharedTransposed())
    m = s.model
    table = magnitude_scores(s)
    cases = {"stem": (m.stem.weight, 1, False), "up": (m.up.weight, 4, True),
             "dw": (m.dw.weight, 8, True), "plain": (m.plain.weight, 1, True),
             "fw": (m.fw, 3, True), "a": (m.a.weight, 1, False)}
    for key, (w, groups, transposed) in cases.items():
        want = _independent_out_norms(w.detach().double(), groups, transposed)
        got = torch.as_tensor(table[key]["a"])
        assert got.shape == want.shape, key
        assert torch.allclose(got, want), key


def test_grouped_transposed_convs_are_pruned_by_whole_groups() -> None:
    s = _surgeon(SharedTransposed())
    layers = {la.name: la for la in s.topology.layers()}
    assert {"up", "dw", "plain"} <= set(layers)
    routes = s.export_routes(keep=0.5, scores="magnitude")  # verified against masked references
    for route in routes.values():
        up, dw = route.get_submodule("up"), route.get_submodule("dw")
        assert up.weight.shape[0] < 16 and up.groups < 4  # whole groups of up went
        assert up.in_channels == up.weight.shape[0]
        assert up.out_channels == up.groups * 2
        assert dw.groups == dw.in_channels < 8 and dw.out_channels == 2 * dw.in_channels
        with torch.no_grad():
            route(*s.example_inputs())  # runs at its new sizes


def test_keep_all_needs_no_scores() -> None:
    s = _surgeon(UncommonLayers())
    want = _outputs(s)
    routes = s.export_routes(keep=1.0)  # untrained: no importance scores exist
    for t, r in routes.items():
        with torch.no_grad():
            assert torch.allclose(r(*s.example_inputs()), want[t], rtol=1e-5, atol=1e-6)
    with pytest.raises(rs.InputError, match="no importance scores"):
        s.export_routes(keep=0.5)


def test_bad_scores_are_reported_for_a_task_that_reaches_the_layer() -> None:
    s = _surgeon(UncommonLayers())
    table = {name: dict(per) for name, per in magnitude_scores(s).items()}
    table["up"] = {t: torch.ones(16) for t in s.tasks}  # in-channel count, not out
    with pytest.raises(rs.InputError, match=r"layer 'up', task 'seg' have shape \(16,\); the "
                                            r"layer has 8 output channels"):
        s.export_routes(keep=0.5, scores=table)
    table["up"] = {"seg": torch.ones(8), "cls": torch.ones(3)}  # only the other task's is bad
    with pytest.raises(rs.InputError, match=r"task 'cls' \(a task that does not reach it; "
                                            r"\['seg'\] do\)"):
        s.export_routes(keep=0.5, scores=table)


class AssertsLater(nn.Module):
    """An early exit and a later stage whose feature size is asserted (as timm's attention
    blocks do): the early route must not keep the later stage alive."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.late = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch._assert(x.shape[2] == 8, "input size")
        early = F.relu(self.stem(x))
        late = self.late(early)
        torch._assert(late.shape[2] == 4, "late feature size")
        return early, self.head(F.relu(late))


def test_assertions_on_unreached_layers_leave_the_route() -> None:
    s = _surgeon(AssertsLater())
    want = s.model(*s.example_inputs())
    routes = s.export_routes(keep=1.0)
    early = routes["out0"]
    kept = {n.target for n in early.graph.nodes if n.op == "call_module"}
    assert kept == {"stem"}
    asserts = [n for n in early.graph.nodes if n.target is torch._assert]
    assert len(asserts) == 1  # the input-size check stays
    with torch.no_grad():
        assert torch.equal(early(*s.example_inputs()), want[0])
        assert torch.equal(routes["out1"](*s.example_inputs()), want[1])


class OtherLayouts(nn.Module):
    """Embedding (num, dim), Bilinear (out, in1, in2) and a functional einsum weight: layouts no
    channel rule claims, so their channels stay whole while the rest is pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bil = nn.Bilinear(8, 8, 6)
        self.mix = nn.Parameter(torch.randn(6, 6, 4))
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = (x[:, 0, 0, :3].abs() * 3).long().clamp(max=9)
        e = self.emb(tokens).mean(1)
        f = F.relu(self.conv(x)).mean((2, 3))
        z = torch.einsum("bi,ijk->bk", F.relu(self.bil(e, f)), self.mix.sum(1, keepdim=True))
        return {"a": self.a(z), "b": self.b(z)}


def test_layouts_without_a_rule_stay_whole() -> None:
    s = _surgeon(OtherLayouts())
    routes = s.export_routes(keep=0.5, scores="magnitude")  # verified against masked references
    for route in routes.values():
        params = dict(route.named_parameters())
        assert params["emb.weight"].shape == (10, 8)
        assert params["bil.weight"].shape == (6, 8, 8)


def test_transposed_conv_flops_count_every_input_element_once() -> None:
    s = _surgeon(SharedTransposed())
    layers = {la.name: la for la in s.topology.layers()}
    m = s.model
    # a transposed conv multiplies every input element with one (out/groups x kernel) row
    in_numel = {"up": 16 * 8 * 8, "dw": 8 * 16 * 16, "plain": 16 * 16 * 16,
                "conv_transpose2d": 12 * 16 * 16}  # the functional one, named by its node
    weights = {"up": m.up.weight, "dw": m.dw.weight, "plain": m.plain.weight,
               "conv_transpose2d": m.fw}
    for name, n_in in in_numel.items():
        assert layers[name].flops == 2 * n_in * weights[name][0].numel(), name
