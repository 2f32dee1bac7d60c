"""Random multi-output conv nets for fuzzing routesurgeon, and the check every net must pass.

A net is described by a JSON-serialisable *spec* (a dict), drawn by ``draw_spec`` from any source
of choices: a seeded ``random.Random`` (``spec_from_seed``, for the benchmark) or hypothesis
(``specs()``, which shrinks failures to small specs). ``GenNet(spec)`` builds the ``nn.Module``.

Trunk blocks: plain/strided convs (optional BatchNorm), residual adds, depthwise convs (channel
multiplier 1 or 2), grouped convs, branch concats, chunk/split/slice along channels merged by
concat, add or gating, SE-style gating (conv or linear excitation), pooling and, rarely, a channel
shuffle. Heads (2-4 tasks) tap the trunk at different depths: pooled or flattened linear heads,
dense heads upsampled to the input size (interpolation or transposed conv), and heads fed by two
depths (concat after resize, or after pooling).

``check_spec`` instruments a net, trains it a few DR-MGF steps, exports routes at several keep
fractions with learned and magnitude scores and checks every route independently: it returns
``"correct"``, ``"refused"`` (some filter group kept whole, every such group with a reason) or
``"wrong"`` (a mismatch, a crash, or a group kept whole without a reason).
"""

from __future__ import annotations

import copy
import math
import random
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import routesurgeon as rs
from routesurgeon.errors import UnsupportedOpError
from routesurgeon.export import relative_error

__all__ = [
    "BLOCK_KINDS",
    "HEAD_KINDS",
    "Chooser",
    "GenNet",
    "Outcome",
    "RandomChooser",
    "check_spec",
    "draw_spec",
    "spec_from_seed",
    "specs",
]

BLOCK_KINDS = ("conv", "res", "dw", "group", "cat", "chunk", "se", "pool", "scale", "shuffle")
HEAD_KINDS = ("linear", "dense", "fuse")
KEEPS = (1.0, 0.5, 0.25)
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Drawing specs
# ---------------------------------------------------------------------------------------------
class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...  # inclusive bounds

    def choice(self, options: Sequence[Any]) -> Any: ...


class RandomChooser:
    """Choices from a seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]


def _divisors(n: int, upto: int) -> list[int]:
    return [d for d in range(2, upto + 1) if n % d == 0]


def _draw_block(ch: Chooser, c: int, s: int) -> tuple[dict[str, Any], int, int]:
    """One trunk block on ``c`` channels at spatial size ``s``: (block, channels, size)."""
    kinds = [k for k in BLOCK_KINDS if k != "shuffle" or ch.integer(0, 3) == 0]
    if s < 4:
        kinds = [k for k in kinds if k != "pool"]
    if not _divisors(c, 4):
        kinds = [k for k in kinds if k not in ("group", "shuffle")]
    kind = ch.choice(kinds)
    bn = bool(ch.integer(0, 1))
    stride = 2 if s >= 4 and ch.integer(0, 3) == 0 else 1
    if kind == "conv":
        co = ch.integer(2, 12)
        return {"kind": kind, "out": co, "k": ch.choice([1, 3]), "stride": stride, "bn": bn,
                "act": ch.choice(["relu", "silu", "none"])}, co, s // stride
    if kind == "res":
        return {"kind": kind, "mid": ch.integer(2, 10), "bn": bn,
                "sub": bool(ch.integer(0, 3) == 0)}, c, s
    if kind == "dw":
        mult = ch.choice([1, 2])
        return {"kind": kind, "mult": mult, "stride": stride, "bn": bn,
                "pw": ch.integer(0, 10)}, c * mult, s // stride
    if kind == "group":
        g = ch.choice(_divisors(c, 4))
        co = g * ch.integer(1, 3)
        return {"kind": kind, "groups": g, "out": co, "bn": bn}, co, s
    if kind == "cat":
        a = ch.integer(1, 8)
        ident = bool(ch.integer(0, 2) == 0)
        b = c if ident else ch.integer(1, 8)
        return {"kind": kind, "a": a, "b": b, "identity": ident}, a + b, s
    if kind == "chunk":
        if c < 2:
            return {"kind": "conv", "out": 4, "k": 1, "stride": 1, "bn": bn, "act": "relu"}, 4, s
        mode = ch.choice(["chunk", "split", "slice"])
        # torch.chunk puts the remainder in the first part
        first = (c + 1) // 2 if mode == "chunk" else ch.integer(1, c - 1)
        second = c - first
        merges = ["cat"] + (["add", "gate"] if first == second else [])
        merge = ch.choice(merges)
        out = c if merge == "cat" else first
        return {"kind": kind, "mode": mode, "first": first, "merge": merge}, out, s
    if kind == "se":
        return {"kind": kind, "hidden": ch.integer(1, 6), "impl": ch.choice(["conv", "linear"]),
                "gate": ch.choice(["sigmoid", "hardsigmoid"])}, c, s
    if kind == "pool":
        return {"kind": kind, "op": ch.choice(["max", "avg"])}, c, s // 2
    if kind == "scale":  # layer scale: a per-channel parameter, used directly or reshaped
        return {"kind": kind, "form": ch.choice(["param", "param", "view"])}, c, s
    # shuffle
    g = ch.choice(_divisors(c, 4))
    return {"kind": kind, "groups": g}, c, s


def _draw_head(ch: Chooser, taps: list[tuple[int, int]], n_blocks: int, used: set[int]
               ) -> dict[str, Any]:
    depths = list(range(n_blocks + 1))
    fresh = [d for d in depths if d not in used] or depths
    d = ch.choice(fresh)
    used.add(d)
    kind = ch.choice(HEAD_KINDS) if n_blocks >= 1 else ch.choice(["linear", "dense"])
    out = ch.integer(1, 5)
    if kind == "linear":
        c, s = taps[d]
        flat = ["flatten", "view"] if c * s * s <= 512 else []
        pool = ch.choice(["mean", "adaptive", *flat])
        return {"kind": kind, "taps": [d], "pool": pool, "hidden": ch.choice([0, 0, 6]),
                "out": out}
    if kind == "dense":
        return {"kind": kind, "taps": [d], "mid": ch.integer(2, 8), "out": out,
                "up": ch.choice(["bilinear", "nearest", "convT"])}
    other = ch.choice([x for x in depths if x != d])
    return {"kind": kind, "taps": sorted([d, other]), "dense": bool(ch.integer(0, 1)),
            "out": out}


def draw_spec(ch: Chooser, seed: int = 0) -> dict[str, Any]:
    """A random net spec (see the module docstring)."""
    size = ch.choice([16, 32])
    width = ch.integer(2, 8)
    taps: list[tuple[int, int]] = [(width, size)]  # (channels, spatial size) after each block
    blocks: list[dict[str, Any]] = []
    c, s = width, size
    for _ in range(ch.integer(2, 6)):
        block, c, s = _draw_block(ch, c, s)
        blocks.append(block)
        taps.append((c, s))
    used: set[int] = set()
    heads = [_draw_head(ch, taps, len(blocks), used) for _ in range(ch.integer(2, 4))]
    method = ch.choice(["drmgf-step", "drmgf-step", "drmgf"])
    return {"seed": seed, "size": size, "width": width, "stem_bn": bool(ch.integer(0, 1)),
            "blocks": blocks, "heads": heads, "method": method}


def spec_from_seed(seed: int) -> dict[str, Any]:
    return draw_spec(RandomChooser(seed), seed)


def specs() -> Any:
    """A hypothesis strategy of specs (imported lazily: only tests need hypothesis)."""
    from hypothesis import strategies as st

    class _Hyp:
        def __init__(self, draw: Callable[[Any], Any]) -> None:
            self.draw = draw

        def integer(self, lo: int, hi: int) -> int:
            return int(self.draw(st.integers(lo, hi)))

        def choice(self, options: Sequence[Any]) -> Any:
            return self.draw(st.sampled_from(list(options)))

    @st.composite
    def _spec(draw: Callable[[Any], Any]) -> dict[str, Any]:
        return draw_spec(_Hyp(draw), seed=int(draw(st.integers(0, 2**16))))

    return _spec()


# ---------------------------------------------------------------------------------------------
# Building nets
# ---------------------------------------------------------------------------------------------
def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "silu": nn.SiLU(), "none": nn.Identity()}[name]


def _norm(c: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if bn else nn.Identity()


class GenNet(nn.Module):
    """The ``nn.Module`` a spec describes; returns ``{"t0": ..., "t1": ...}``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        torch.manual_seed(int(spec["seed"]))
        c, s = int(spec["width"]), int(spec["size"])
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stem_bn = _norm(c, bool(spec["stem_bn"]))
        self.blocks = nn.ModuleList()
        taps = [(c, s)]
        for b in spec["blocks"]:
            m, c, s = self._block(b, c, s)
            self.blocks.append(m)
            taps.append((c, s))
        self.taps = taps
        self.heads = nn.ModuleList([self._head(h, taps, int(spec["size"]))
                                    for h in spec["heads"]])
        for m in self.modules():  # non-trivial BN statistics and affine parameters
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)

    @staticmethod
    def _block(b: dict[str, Any], c: int, s: int) -> tuple[nn.Module, int, int]:
        k = b["kind"]
        m = nn.ModuleDict()
        if k == "conv":
            ks, st = int(b["k"]), int(b["stride"])
            m["conv"] = nn.Conv2d(c, b["out"], ks, stride=st, padding=ks // 2)
            m["bn"] = _norm(b["out"], b["bn"])
            m["act"] = _act(b["act"])
            return m, b["out"], s // st
        if k == "res":
            m["c1"] = nn.Conv2d(c, b["mid"], 3, padding=1)
            m["c2"] = nn.Conv2d(b["mid"], c, 1)
            m["bn"] = _norm(c, b["bn"])
            return m, c, s
        if k == "dw":
            co = c * b["mult"]
            m["dw"] = nn.Conv2d(c, co, 3, stride=b["stride"], padding=1, groups=c)
            m["bn"] = _norm(co, b["bn"])
            if b["pw"]:
                m["pw"] = nn.Conv2d(co, co, 1)
            return m, co, s // b["stride"]
        if k == "group":
            m["conv"] = nn.Conv2d(c, b["out"], 3, padding=1, groups=b["groups"])
            m["bn"] = _norm(b["out"], b["bn"])
            return m, b["out"], s
        if k == "cat":
            m["a"] = nn.Conv2d(c, b["a"], 1)
            if not b["identity"]:
                m["b"] = nn.Conv2d(c, b["b"], 3, padding=1)
            return m, b["a"] + b["b"], s
        if k == "chunk":
            first = b["first"]
            m["conv"] = nn.Conv2d(first, first, 3, padding=1)
            return m, (c if b["merge"] == "cat" else first), s
        if k == "se":
            if b["impl"] == "conv":
                m["fc1"] = nn.Conv2d(c, b["hidden"], 1)
                m["fc2"] = nn.Conv2d(b["hidden"], c, 1)
            else:
                m["fc1"] = nn.Linear(c, b["hidden"])
                m["fc2"] = nn.Linear(b["hidden"], c)
            return m, c, s
        if k == "pool":
            return m, c, s // 2
        if k == "scale":
            shape = (c, 1, 1) if b["form"] == "param" else (c,)
            m.register_parameter("gamma", nn.Parameter(torch.rand(shape) + 0.5))
            return m, c, s
        if k == "shuffle":
            return m, c, s
        raise NotImplementedError(f"netgen: unknown block kind {k!r}")

    @staticmethod
    def _head(h: dict[str, Any], taps: list[tuple[int, int]], size: int) -> nn.Module:
        m = nn.ModuleDict()
        k = h["kind"]
        if k == "linear":
            c, s = taps[h["taps"][0]]
            n_in = c * s * s if h["pool"] in ("flatten", "view") else c
            if h["hidden"]:
                m["fc0"] = nn.Linear(n_in, h["hidden"])
                n_in = h["hidden"]
            m["fc"] = nn.Linear(n_in, h["out"])
        elif k == "dense":
            c, s = taps[h["taps"][0]]
            m["conv"] = nn.Conv2d(c, h["mid"], 3, padding=1)
            if h["up"] == "convT" and size // s > 1:
                f = size // s
                m["up"] = nn.ConvTranspose2d(h["mid"], h["mid"], f, stride=f)
            m["out"] = nn.Conv2d(h["mid"], h["out"], 1)
        elif k == "fuse":
            c = taps[h["taps"][0]][0] + taps[h["taps"][1]][0]
            m["fc"] = nn.Conv2d(c, h["out"], 1) if h["dense"] else nn.Linear(c, h["out"])
        else:
            raise NotImplementedError(f"netgen: unknown head kind {k!r}")
        return m

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = F.relu(self.stem_bn(self.stem(x)))
        feats = [y]
        for b, m in zip(self.spec["blocks"], self.blocks):
            y = self._run_block(b, m, y)
            feats.append(y)
        return {f"t{i}": self._run_head(h, m, feats)
                for i, (h, m) in enumerate(zip(self.spec["heads"], self.heads))}

    @staticmethod
    def _run_block(b: dict[str, Any], m: Any, x: torch.Tensor) -> torch.Tensor:
        k = b["kind"]
        if k == "conv":
            return m["act"](m["bn"](m["conv"](x)))
        if k == "res":
            r = m["bn"](m["c2"](F.relu(m["c1"](x))))
            return F.relu(x - r if b["sub"] else x + r)
        if k == "dw":
            y = F.relu(m["bn"](m["dw"](x)))
            return m["pw"](y) if "pw" in m else y
        if k == "group":
            return F.relu(m["bn"](m["conv"](x)))
        if k == "cat":
            other = x if b["identity"] else m["b"](x)
            return torch.cat([m["a"](x), other], dim=1)
        if k == "chunk":
            first = b["first"]
            if b["mode"] == "chunk":
                a, c = x.chunk(2, dim=1)
            elif b["mode"] == "split":
                a, c = torch.split(x, [first, x.shape[1] - first], dim=1)
            else:
                a, c = x[:, :first], x[:, first:]
            a = F.relu(m["conv"](a))
            if b["merge"] == "cat":
                return torch.cat([a, c], dim=1)
            if b["merge"] == "add":
                return a + c
            return a * torch.sigmoid(c)
        if k == "se":
            gate = torch.sigmoid if b["gate"] == "sigmoid" else F.hardsigmoid
            if b["impl"] == "conv":
                z = F.adaptive_avg_pool2d(x, 1)
                return x * gate(m["fc2"](F.relu(m["fc1"](z))))
            z = x.mean((2, 3))
            w = gate(m["fc2"](F.relu(m["fc1"](z))))
            return x * w[:, :, None, None]
        if k == "pool":
            return F.max_pool2d(x, 2) if b["op"] == "max" else F.avg_pool2d(x, 2)
        if k == "scale":
            g = m.gamma if b["form"] == "param" else m.gamma.view(1, -1, 1, 1)
            return x * g
        if k == "shuffle":
            n, c, h, w = x.shape
            g = b["groups"]
            return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)
        raise NotImplementedError(f"netgen: unknown block kind {k!r}")

    def _run_head(self, h: dict[str, Any], m: Any, feats: list[torch.Tensor]) -> torch.Tensor:
        k = h["kind"]
        if k == "linear":
            z = feats[h["taps"][0]]
            if h["pool"] == "mean":
                z = z.mean((2, 3))
            elif h["pool"] == "adaptive":
                z = torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)
            elif h["pool"] == "view":
                z = z.view(z.shape[0], -1)
            else:
                z = z.flatten(1)
            if "fc0" in m:
                z = F.relu(m["fc0"](z))
            return m["fc"](z)
        if k == "dense":
            y = F.relu(m["conv"](feats[h["taps"][0]]))
            size = int(self.spec["size"])
            if "up" in m:
                y = m["up"](y)
            elif y.shape[-1] != size:
                y = F.interpolate(y, size=(size, size), mode=h["up"] if h["up"] != "convT"
                                  else "nearest")
            return m["out"](y)
        a, b = feats[h["taps"][0]], feats[h["taps"][1]]
        if h["dense"]:
            b = F.interpolate(b, size=a.shape[-2:], mode="nearest")
            return m["fc"](torch.cat([a, b], dim=1))
        return m["fc"](torch.cat([a.mean((2, 3)), b.mean((2, 3))], dim=1))


# ---------------------------------------------------------------------------------------------
# Checking a net
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What happened to one net: ``status`` is ``correct``, ``refused`` or ``wrong``."""

    status: str
    detail: str = ""
    refusals: list[str] = field(default_factory=list)
    max_error: float = 0.0
    routes_checked: int = 0


def _benign(reason: str) -> bool:
    return reason.startswith("model output")


def refusals(surgeon: rs.Surgeon) -> tuple[list[str], list[int]]:
    """Reasons of the filter groups kept whole, and fixed filter groups that have no reason.

    A group is a *filter* group when it holds output channels of some conv/linear layer; groups
    fixed only because they are the model's outputs or its input channels are not refusals.
    """
    g = surgeon.channel_groups
    filter_groups: set[int] = set()
    for info in g.layers.values():
        if info["kind"] != "norm":
            filter_groups.update(int(x) for x in g.labels[info["out"]])
    reasons, missing = [], []
    for grp in sorted(filter_groups):
        if not g.fixed[grp]:
            continue
        why = g.reasons.get(grp)
        if not why:
            missing.append(grp)
        elif not _benign(why):
            reasons.append(why)
    return reasons, missing


def _targets(out: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {t: torch.randn(v.shape, generator=gen) for t, v in out.items()}


def _train(surgeon: rs.Surgeon, model: nn.Module, spec: dict[str, Any], x: torch.Tensor,
           gen: torch.Generator) -> None:
    model.train()
    opt = torch.optim.Adam(surgeon.model_parameters(), lr=1e-2)
    losses = {t: F.mse_loss for t in surgeon.tasks}
    with torch.no_grad():
        targets = _targets(model(x), gen)
    if spec["method"] == "drmgf":
        tr = rs.Trainer(surgeon, opt, method="drmgf", config={"cycle_steps": 2}, progress=False)
        xs = [torch.randn(x.shape, generator=gen) for _ in range(2)]
        tr.fit_epoch([(xi, targets) for xi in xs], losses)
    else:
        tr = rs.Trainer(surgeon, opt, method="drmgf-step", progress=False)
        for _ in range(2):
            tr.train_step(torch.randn(x.shape, generator=gen), targets, losses)
    model.eval()


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def check_spec(spec: dict[str, Any], keeps: Sequence[float] = KEEPS) -> Outcome:
    """Instrument, train a few DR-MGF steps, export and independently check every route."""
    try:
        return _check(spec, keeps)
    except UnsupportedOpError as e:  # a clear refusal of the whole model
        return Outcome("refused", f"UnsupportedOpError: {e}", [str(e)])
    except Exception as e:
        tb = traceback.format_exc(limit=6)
        return Outcome("wrong", f"{type(e).__name__}: {e}\n{tb}")


def _float64_error(route: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    """Relative error of ``route`` against ``reference``, both run in float64 (on copies)."""
    a, b = copy.deepcopy(route).double().eval(), copy.deepcopy(reference).double().eval()
    with torch.no_grad():
        return relative_error(a(x.double()), b(x.double()))


def _check(spec: dict[str, Any], keeps: Sequence[float]) -> Outcome:
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    size = int(spec["size"])
    x = torch.randn(2, 3, size, size, generator=gen)
    model = GenNet(spec).train()
    surgeon = rs.instrument(model, x)
    reasons, missing = refusals(surgeon)
    if missing:
        return Outcome("wrong", f"filter groups {missing} kept whole without a reason")
    _train(surgeon, model, spec, x, gen)
    x2 = torch.randn(2, 3, size, size, generator=gen)  # not the export's verification input
    with torch.no_grad():
        full = model(x2)
    worst, checked = 0.0, 0
    for scores in (None, "magnitude"):
        base: dict[str, tuple[int, Any]] = {}
        for keep in keeps:
            routes = surgeon.export_routes(keep=keep, scores=scores)
            for task, route in routes.items():
                mask = surgeon.route_masks(task, keep=keep, scores=scores)
                with torch.no_grad():
                    got = route(x2)
                    if keep == 1.0 and not torch.equal(got, full[task]):
                        err = relative_error(got, full[task])
                        return Outcome("wrong", f"unpruned route {task!r} ({scores}) differs "
                                       f"from the model by {err:.3g}")
                    masked = surgeon.masked(task, keep=keep, scores=scores)
                    ref = masked(x2)
                err = relative_error(got, ref)
                if not err <= TOL and math.isfinite(err):
                    # float32 rounding can look large next to an output that cancels to almost
                    # zero; a wrong channel is an O(1) error in float64 too, rounding is not
                    err = _float64_error(route, masked, x2)
                if not err <= TOL or not math.isfinite(err):
                    return Outcome("wrong", f"route {task!r} keep={keep} scores={scores} differs "
                                   f"from its masked reference by {err:.3g}")
                worst, checked = max(worst, err), checked + 1
                n = _n_params(route)
                if keep == 1.0:
                    base[task] = (n, mask)
                    continue
                n1, mask1 = base[task]
                if (mask.pruned & ~mask1.pruned).any() and not n < n1:
                    return Outcome("wrong", f"route {task!r} keep={keep} prunes groups but has "
                                   f"{n} parameters, unpruned {n1}")
                if (mask1.pruned & ~mask.pruned).any():
                    return Outcome("wrong", f"route {task!r} keep={keep} keeps groups that "
                                   "keep=1.0 drops")
    status = "refused" if reasons else "correct"
    return Outcome(status, "", sorted(set(reasons)), worst, checked)
