"""Channel rules that prune more without guessing: layer scales reached through views, grouped
convolutions pruned by whole groups, flatten written as ``view(n, -1)``, channel shuffles; and the
cases that must stay refused (a literal channel count, a parameter also used whole, a shuffle
whose group count would change)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.outputs import leaf_values
from routesurgeon.routes import magnitude_scores

C = 8


def _scores(s: rs.Surgeon, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Different random per-task scores for every scored layer (so routes differ per task)."""
    rng = np.random.default_rng(seed)
    return {layer: {t: rng.random(len(v)) for t, v in per.items()}
            for layer, per in magnitude_scores(s).items()}


def _check_routes(s: rs.Surgeon, keep: float = 0.5) -> dict[str, torch.fx.GraphModule]:
    """keep=1.0 routes equal the model to the bit; pruned routes match their masked reference
    on an input other than the export's verification input, and have fewer parameters."""
    scores = _scores(s)
    x2 = torch.randn_like(s.example_inputs()[0])
    with torch.no_grad():
        leaves = leaf_values(s.model.eval()(x2), s.outputs.names)
    full = {t: leaves[o] for t, o in zip(s.outputs.tasks, s.outputs.task_outputs)}
    unpruned = s.export_routes(keep=1.0, scores=scores)
    pruned = s.export_routes(keep=keep, scores=scores)
    for t in s.tasks:
        with torch.no_grad():
            assert torch.equal(unpruned[t](x2), full[t]), t
            got = pruned[t](x2)
            want = s.masked(t, keep=keep, scores=scores)(x2)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        n_full = sum(p.numel() for p in unpruned[t].parameters())
        assert sum(p.numel() for p in pruned[t].parameters()) < n_full, t
    return pruned


def _reasons(s: rs.Surgeon) -> list[str]:
    """Why filter groups (output channels of a conv/linear) are kept whole, outputs aside."""
    g = s.channel_groups
    filters = {int(x) for i in g.layers.values() if i["kind"] != "norm"
               for x in g.labels[i["out"]]}
    return [r for k, r in g.reasons.items() if k in filters and not r.startswith("model output")]


# -- 1. per-channel parameters reached through a chain of singleton-dim views ----------------------
SCALE_FORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "view": lambda g: g.view(1, -1, 1, 1),
    "reshape": lambda g: g.reshape(1, -1, 1, 1),
    "torch.reshape": lambda g: torch.reshape(g, (1, -1, 1, 1)),
    "index-none": lambda g: g[None, :, None, None],
    "unsqueeze": lambda g: g.unsqueeze(-1).unsqueeze(-1),
    "view-then-index": lambda g: g.view(-1, 1)[None, ..., None],
}


class ScaleNet(nn.Module):
    """conv -> x * gamma_k for every form in ``SCALE_FORMS`` and timm's LayerScale2d -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, C, 3, padding=1)
        self.gammas = nn.ParameterList([nn.Parameter(torch.rand(C) + 0.5) for _ in SCALE_FORMS])
        self.ls = _timm_layer_scale()
        self.c2 = nn.Conv2d(C, C, 3, padding=1)
        self.ha = nn.Linear(C, 3)
        self.hb = nn.Linear(C, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c1(x))
        for form, gamma in zip(SCALE_FORMS.values(), self.gammas):
            y = y * form(gamma)
        y = self.ls(y)
        z = F.relu(self.c2(y)).mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z)}


def _timm_layer_scale() -> nn.Module:
    from timm.layers import LayerScale2d

    m = LayerScale2d(C, init_values=1.0)
    with torch.no_grad():
        m.gamma.uniform_(0.5, 1.5)
    return m


def test_layer_scales_through_views_are_sliced(x: torch.Tensor) -> None:
    s = rs.instrument(ScaleNet().eval(), x)
    assert _reasons(s) == []  # nothing kept whole: every scale is sliced with the channels
    paths = [f"gammas.{i}" for i in range(len(SCALE_FORMS))] + ["ls.gamma"]
    params = s.channel_groups.state.params
    assert all((p, 0) in params for p in paths), sorted(params)
    routes = _check_routes(s)
    for r in routes.values():
        named = dict(r.named_parameters())
        kept = named["c1.weight"].shape[0]
        assert kept < C
        for p in paths:
            assert named[p].shape == (kept,), p


class BadScaleNet(nn.Module):
    """Scales whose slicing would be unsound: they must keep their channels whole."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(3, C, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(C) + 0.5)
        self.g2 = nn.Parameter(torch.rand(C, 2) + 0.5)
        self.g3 = nn.Parameter(torch.rand(1, C) + 0.5)
        self.c2 = nn.Conv2d(C, C, 1)
        self.ha = nn.Linear(C, 3)
        self.hb = nn.Linear(C, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c1(x))
        if self.kind == "literal":  # a channel count export would not rewrite
            y = y * self.gamma.view(1, C, 1, 1)
        elif self.kind == "shared-view":  # the view also feeds an op that reads every channel
            g = self.gamma.view(1, -1, 1, 1)
            y = y * g + g.sum()
        elif self.kind == "other-use":  # the parameter itself also feeds a reduction
            y = y * self.gamma.view(1, -1, 1, 1) + torch.cumsum(self.gamma, 0)[-1]
        elif self.kind == "two-dims":  # a (C, 2) parameter: not a per-channel vector
            y = y * self.g2[:, :1].reshape(1, -1, 1, 1)
        elif self.kind == "whole-use":  # sliceable here, but also used whole with new channels
            whole = torch.ones(1, C, 1, 1) * self.gamma.view(1, -1, 1, 1)
            y = y * self.gamma.view(1, -1, 1, 1) + whole.sum()
        elif self.kind == "squeeze-channels":  # squeeze(1) would drop a one-channel dim later
            y = y * self.g3.squeeze(1).view(1, -1, 1, 1)
        z = self.c2(y).mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z)}


@pytest.mark.parametrize(
    "kind", ["literal", "shared-view", "other-use", "two-dims", "whole-use", "squeeze-channels"])
def test_unsound_scale_chains_stay_refused(kind: str, x: torch.Tensor) -> None:
    s = rs.instrument(BadScaleNet(kind).eval(), x)
    g = s.channel_groups
    c1 = next(n for n in g.layers if n.target == "c1")
    assert g.fixed[g.labels[g.layers[c1]["out"]]].all()  # c1's filters are kept whole
    if kind == "whole-use":
        assert any("also used whole" in r for r in _reasons(s)), _reasons(s)
    else:
        assert not any(p in ("gamma", "g2", "g3") for p, _ in g.state.params)
    assert _reasons(s), "a refusal must come with a logged reason"
    if kind == "literal":
        _check_routes(s)  # the rest (c2) still prunes correctly


# -- 2. flatten written as view(n, -1) before a linear ---------------------------------------------
class ViewFlattenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, C, 3, padding=1, stride=4)
        self.ha = nn.Linear(C * 16, 3)
        self.hb = nn.Linear(C * 16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c1(x))
        z = y.view(y.shape[0], -1)
        return {"a": self.ha(z), "b": self.hb(z)}


def test_view_flatten_before_linear_is_pruned(x: torch.Tensor) -> None:
    s = rs.instrument(ViewFlattenNet().eval(), x)
    assert _reasons(s) == []
    routes = _check_routes(s)
    for r in routes.values():
        w = dict(r.named_parameters())
        assert w["c1.weight"].shape[0] < C
        assert next(v for k, v in w.items() if k.endswith("weight") and v.ndim == 2).shape[1] \
            == w["c1.weight"].shape[0] * 16  # the linear lost 16 inputs per removed channel


# -- 3. grouped convolutions: whole groups removed -----------------------------------------------
class GroupNet(nn.Module):
    """conv -> grouped conv (module or functional) -> [residual] -> conv, two heads."""

    def __init__(self, groups: int, c_out: int, functional: bool, residual: bool) -> None:
        super().__init__()
        self.groups, self.functional, self.residual = groups, functional, residual
        self.c1 = nn.Conv2d(3, C, 3, padding=1)
        self.g = nn.Conv2d(C, c_out, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, 6, 1)
        self.ha = nn.Linear(6, 3)
        self.hb = nn.Linear(6, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c1(x))
        if self.functional:
            z = F.conv2d(y, self.g.weight, self.g.bias, 1, 1, 1, self.groups)
        else:
            z = self.g(y)
        z = F.relu(self.bn(z))
        if self.residual:
            z = z + y
        z = F.relu(self.c2(z)).mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z)}


@pytest.mark.parametrize(
    ("groups", "c_out", "functional", "residual"),
    [(2, 12, False, False), (4, 8, False, True), (4, 4, False, False), (2, 12, True, False),
     (4, 8, True, True)],
)
def test_grouped_conv_prunes_whole_groups(groups: int, c_out: int, functional: bool,
                                          residual: bool, x: torch.Tensor) -> None:
    s = rs.instrument(GroupNet(groups, c_out, functional, residual).eval(), x)
    assert not any("grouped" in r for r in _reasons(s))
    g = s.channel_groups
    node = next(n for n, i in g.layers.items() if i.get("groups", 1) == groups)
    info = g.layers[node]
    a, b = C // groups, c_out // groups
    labels_in, labels_out = g.labels[info["in"]], g.labels[info["out"]]
    for j in range(groups):  # a group's in- and out-channels form one coupled group
        members = np.concatenate([labels_in[j * a:(j + 1) * a], labels_out[j * b:(j + 1) * b]])
        assert len(np.unique(members)) == 1
    assert len(np.unique(labels_out)) == groups  # and different groups stay separate
    routes = _check_routes(s)
    for t, r in routes.items():
        kept = ~s.route_masks(t, keep=0.5, scores=_scores(s)).pruned[np.unique(labels_out)]
        assert 0 < kept.sum() < groups
        w = dict(r.named_parameters())["g.weight"]
        assert w.shape == (int(kept.sum()) * b, a, 3, 3)  # whole groups gone, groups intact
        if not functional:
            conv = r.get_submodule("g")
            assert isinstance(conv, nn.Conv2d)
            assert (conv.groups, conv.in_channels, conv.out_channels) == (
                int(kept.sum()), int(kept.sum()) * a, int(kept.sum()) * b)
        else:
            assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in r.modules())


def test_grouped_conv_route_is_a_standard_savable_module(x: torch.Tensor, tmp_path) -> None:
    s = rs.instrument(GroupNet(4, 8, False, False).eval(), x)
    route = _check_routes(s)["a"]
    torch.save(route, tmp_path / "r.pt")
    again = torch.load(tmp_path / "r.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), route(x))


# -- 4. channel shuffle: channel i of every group goes together ----------------------------------
class ShuffleNet(nn.Module):
    """conv -> channel shuffle (written ``form``) -> conv, two heads."""

    def __init__(self, form: str, groups: int = 2) -> None:
        super().__init__()
        self.form, self.groups = form, groups
        self.c1 = nn.Conv2d(3, C, 3, padding=1)
        self.c2 = nn.Conv2d(C, C, 1)
        self.ha = nn.Linear(C, 3)
        self.hb = nn.Linear(C, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.c1(x))
        n, c, h, w = y.shape
        g = self.groups
        if self.form == "transpose":
            y = y.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.form == "permute-flatten":
            y = torch.flatten(y.reshape(n, g, -1, h, w).permute(0, 2, 1, 3, 4), 1, 2)
        elif self.form == "literal-group-size":  # C/g written as a number: export can't rewrite
            y = y.view(n, g, C // g, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.form == "literal-channels":
            y = y.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, C, h, w)
        elif self.form == "group-count-from-shape":  # g would change with the channel count
            y = y.view(n, c // 4, 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        elif self.form == "view-used-twice":
            v = y.view(n, g, c // g, h, w)
            y = v.transpose(1, 2).reshape(n, c, h, w) + v.sum(1).repeat(1, g, 1, 1)
        z = F.relu(self.c2(y)).mean((2, 3))
        return {"a": self.ha(z), "b": self.hb(z)}


@pytest.mark.parametrize(("form", "groups"), [("transpose", 2), ("transpose", 4),
                                              ("transpose", 8), ("permute-flatten", 4)])
def test_channel_shuffle_couples_channel_i_of_every_group(form: str, groups: int,
                                                         x: torch.Tensor) -> None:
    s = rs.instrument(ShuffleNet(form, groups).eval(), x)
    assert _reasons(s) == []
    g = s.channel_groups
    c1 = next(n for n in g.layers if n.target == "c1")
    labels = g.labels[g.layers[c1]["out"]].reshape(groups, C // groups)
    assert (labels == labels[0]).all()  # channel i of each group: one coupled group
    assert len(np.unique(labels[0])) == C // groups
    if groups == C:  # one channel per group: all channels coupled, nothing to prune
        return
    routes = _check_routes(s)
    for r in routes.values():
        assert dict(r.named_parameters())["c1.weight"].shape[0] % groups == 0


@pytest.mark.parametrize("form", ["literal-group-size", "literal-channels",
                                  "group-count-from-shape", "view-used-twice"])
def test_unsound_channel_shuffles_stay_refused(form: str, x: torch.Tensor) -> None:
    s = rs.instrument(ShuffleNet(form).eval(), x)
    g = s.channel_groups
    c1 = next(n for n in g.layers if n.target == "c1")
    assert g.fixed[g.labels[g.layers[c1]["out"]]].all()
    assert _reasons(s)
    if form == "literal-channels":
        _check_routes(s)
