"""Least-squares reconstruction of a route's layers from the full model (no training).

Pruning a route removes input channels of the layers after each cut; what those channels carried
is lost, and BN recalibration (``routesurgeon.recalibrate``) only re-centres and re-scales what
is left. Channel-pruning work (He et al., "Channel Pruning for Accelerating Very Deep Neural
Networks", ICCV 2017; Luo et al., "ThiNet", ICCV 2017) instead re-fits the weights of each layer
whose inputs were cut so that, on a few batches, its output on the kept inputs matches the full
model's output at that layer: a linear least-squares problem per layer.

``reconstruct(route, surgeon, loader, batches=8)`` does that for every ``Conv2d`` (ungrouped,
zero padding) and ``Linear`` of an exported route whose input channels were cut, in graph order
(each layer is fitted on the route's inputs *after* the earlier layers were re-fitted, so errors
do not compound), with a small ridge term; then, by default, it recalibrates the route's norm
statistics. Targets are the full model's pre-norm outputs at the same layer, restricted to the
channels the route keeps. Only modules the route owns are changed (a module shared with the full
model is copied first): the full model and the other routes never change.

After reconstruction a route no longer equals its masked reference (it is not meant to, like a
recalibrated route): ``route.meta["routesurgeon"].reconstructed`` records the batches it saw.

A copy of the surgeon's network pruned by another tool (torch-pruning's per-task copy,
``routesurgeon.tp_anchor``: same module paths, narrower layers, no route record) is re-fitted the
same way: which channels each layer kept is read off its weights, which must be an exact slice
``W[kept_out][:, kept_in]`` of the full model's (anything else, e.g. a copy trained after pruning,
is refused).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from routesurgeon.errors import InputError
from routesurgeon.recalibrate import _check_fits, _inputs_of, _set_module, recalibrate
from routesurgeon.routes import RouteInfo

if TYPE_CHECKING:
    from routesurgeon.surgeon import Surgeon

__all__ = ["reconstruct"]


def _fittable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _targets(route: fx.GraphModule, surgeon: Surgeon, info: RouteInfo
             ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(module path, kept input channels, kept output channels) of the layers to re-fit, in
    graph order: fittable modules whose weight lost input channels."""
    from routesurgeon.export import route_cuts

    cuts = route_cuts(surgeon, info.mask)
    full = surgeon.traced.eval_graph
    calls: dict[str, int] = {}
    for node in route.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    out = []
    for path, n in calls.items():  # graph order; a module called twice is not re-fitted
        if n > 1:
            continue
        axes = dict(cuts.get(f"{path}.weight", []))
        if 1 not in axes or not _fittable(route.get_submodule(path)):
            continue
        mine = cast(torch.Tensor, route.get_submodule(path).weight)
        theirs = cast(torch.Tensor, full.get_submodule(path).weight)
        keep_in = np.flatnonzero(axes[1])
        keep_out = np.flatnonzero(axes[0]) if 0 in axes else np.arange(theirs.shape[0])
        if (len(keep_out), len(keep_in)) != tuple(mine.shape[:2]) or \
                len(axes[1]) != theirs.shape[1]:
            raise InputError(f"route layer {path!r} does not match the surgeon's model "
                             f"(weight {tuple(mine.shape)}, full {tuple(theirs.shape)}): pass "
                             f"the surgeon the route was exported from")
        out.append((path, keep_in, keep_out))
    return out


def _slice_of(small: torch.Tensor, big: torch.Tensor, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept out, kept in) indices with ``small == big[out][:, in]`` exactly, or InputError."""
    def refuse(why: str) -> InputError:
        return InputError(f"layer {path!r}: its weight {tuple(small.shape)} is not an exact slice "
                          f"of the full model's {tuple(big.shape)} ({why}); reconstruct a copy "
                          f"right after pruning, before any training")

    if small.dim() != big.dim() or small.shape[2:] != big.shape[2:] or \
            small.shape[0] > big.shape[0] or small.shape[1] > big.shape[1]:
        raise refuse("shapes")
    # each kernel slice as an id (equal slices, equal ids); pruning keeps the survivors' order,
    # so the kept rows and columns are increasing: match them as subsequences, greedily
    a, b = (t.detach().reshape(t.shape[0] * t.shape[1], -1).cpu().numpy() for t in (big, small))
    _, inv = np.unique(np.concatenate([a, b]), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    b2 = inv[:len(a)].reshape(big.shape[0], big.shape[1])
    s2 = inv[len(a):].reshape(small.shape[0], small.shape[1])

    def holds(row: np.ndarray, sub: np.ndarray) -> bool:  # sub is a subsequence of row
        k = 0
        for v in row:
            if k < len(sub) and v == sub[k]:
                k += 1
        return k == len(sub)

    out_idx: list[int] = []
    r = 0
    for o in range(s2.shape[0]):
        while r < b2.shape[0] and not holds(b2[r], s2[o]):
            r += 1
        if r == b2.shape[0]:
            raise refuse(f"output channel {o} matches none of the full model's, in order")
        out_idx.append(r)
        r += 1
    cols = b2[out_idx]
    in_idx: list[int] = []
    i = 0
    for j in range(s2.shape[1]):
        while i < cols.shape[1] and not np.array_equal(cols[:, i], s2[:, j]):
            i += 1
        if i == cols.shape[1]:
            raise refuse(f"input channel {j} matches none of the full model's, in order")
        in_idx.append(i)
        i += 1
    oi, ii = np.asarray(out_idx), np.asarray(in_idx)
    if not torch.equal(big.detach()[torch.as_tensor(oi)][:, torch.as_tensor(ii)], small.detach()):
        raise refuse("no consistent choice of kept channels")
    return ii, oi


def kept_channels(pruned: nn.Module, surgeon: Surgeon) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(path, kept in, kept out)`` of every fittable layer of a copy pruned elsewhere whose
    weight differs in shape from the full model's, read off the weights, in graph order."""
    full = surgeon.traced.eval_graph
    order = ([str(n.target) for n in pruned.graph.nodes if n.op == "call_module"]
             if isinstance(pruned, fx.GraphModule) else [p for p, _ in pruned.named_modules()][1:])
    out = []
    for path in dict.fromkeys(order):  # graph order: each layer is fitted after those before it
        m = pruned.get_submodule(path)
        if not _fittable(m):
            continue
        try:
            theirs = full.get_submodule(path)
        except AttributeError as e:
            raise InputError(f"module {path!r} of the pruned copy is not in the surgeon's model: "
                             f"only copies whose modules keep the model's names can be read") from e
        mine_w = cast(torch.Tensor, m.weight)
        full_w = cast(torch.Tensor, theirs.weight)
        if mine_w.shape != full_w.shape:
            out.append((path, *_slice_of(mine_w, full_w, path)))
    return out


def _copy_targets(pruned: nn.Module, surgeon: Surgeon) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``_targets`` for a copy pruned elsewhere: its fittable layers narrower in their inputs than
    the full model's."""
    full = surgeon.traced.eval_graph
    return [(path, keep_in, keep_out) for path, keep_in, keep_out in kept_channels(pruned, surgeon)
            if len(keep_in) < cast(torch.Tensor, full.get_submodule(path).weight).shape[1]]


def _rows(m: nn.Module, x: torch.Tensor, y: torch.Tensor, keep_out: np.ndarray, limit: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Design rows (inputs, with a ones column when the layer has a bias) and targets."""
    idx = torch.as_tensor(keep_out, dtype=torch.long, device=y.device)
    if isinstance(m, nn.Linear):
        xs = x.reshape(-1, x.shape[-1])
        ys = y.index_select(y.dim() - 1, idx).reshape(-1, len(keep_out))
    else:
        conv = m
        assert isinstance(conv, nn.Conv2d)
        cols = F.unfold(x, conv.kernel_size, conv.dilation,
                        cast(tuple[int, ...], conv.padding), conv.stride)
        xs = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        ys = y.index_select(1, idx).flatten(2).transpose(1, 2).reshape(-1, len(keep_out))
    if xs.shape[0] != ys.shape[0]:
        raise InputError(f"reconstruction rows do not line up ({xs.shape[0]} inputs, "
                         f"{ys.shape[0]} targets): unsupported layer {m}")
    if xs.shape[0] > limit:
        pick = torch.randperm(xs.shape[0], generator=gen)[:limit].to(xs.device)
        xs, ys = xs[pick], ys[pick]
    if getattr(m, "bias", None) is not None:
        xs = torch.cat([xs, xs.new_ones(xs.shape[0], 1)], 1)
    return xs.double(), ys.double()


class _Captured(Exception):
    """Raised by ``_capture``'s hook to stop a forward once the module of interest has run."""


def _called_once(model: nn.Module) -> set[str]:
    """The module paths ``model``'s graph calls exactly once (none when it is not a graph)."""
    if not isinstance(model, fx.GraphModule):
        return set()
    calls = Counter(str(n.target) for n in model.graph.nodes if n.op == "call_module")
    return {path for path, n in calls.items() if n == 1}


def _capture(model: nn.Module, path: str, inputs: list[Any], want: str, stop: bool) -> torch.Tensor:
    """The input (``want="in"``) or output of ``model``'s module ``path`` on ``inputs``.

    With ``stop`` (the graph calls the module once) the forward stops right after it (the rest
    of the network is not run); otherwise the whole forward runs and a second call is refused."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        got.append((args[0] if want == "in" else out).detach())
        if stop:
            raise _Captured

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        model(*inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if len(got) != 1:
        raise InputError(f"module {path!r} ran {len(got)} times in one forward; reconstruction "
                         f"fits layers that run once")
    return got[0]


@torch.no_grad()
def reconstruct(route: nn.Module, surgeon: Surgeon, loader: Iterable[Any], batches: int = 8,
                ridge: float = 1e-3, rows_per_batch: int = 4096, recalibrate_after: bool = True,
                seed: int = 0) -> nn.Module:
    """Re-fit ``route``'s layers whose inputs were cut to the full model's outputs; returns it.

    ``loader``: training batches (``x``, ``(x, targets)`` or a tuple of inputs; ``batches`` are
    used). ``ridge``: the regulariser, relative to the mean diagonal of each layer's Gram matrix.
    ``rows_per_batch``: positions sampled per batch and layer (a conv has one row per output
    position). ``recalibrate_after``: then re-estimate the norm statistics on the same batches.
    """
    meta = getattr(route, "meta", None)
    info = meta.get("routesurgeon") if isinstance(meta, dict) else None
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise InputError(f"batches must be a positive int, got {batches!r}")
    if not ridge >= 0:
        raise InputError(f"ridge must be >= 0, got {ridge!r}")
    data: list[list[Any]] = []
    for batch in loader:
        if len(data) == batches:
            break
        inputs = _inputs_of(batch)
        _check_fits(route, inputs)
        data.append(inputs)
    if not data:
        raise InputError("the reconstruction loader yielded no batch")
    if isinstance(info, RouteInfo):
        assert isinstance(route, fx.GraphModule)
        targets = _targets(route, surgeon, info)
    else:
        targets = _copy_targets(route, surgeon)
        if not targets:
            raise InputError("reconstruct needs a route returned by Surgeon.export_routes (it "
                             "reads route.meta['routesurgeon'] to know which channels were kept) "
                             "or a pruned copy of the surgeon's network (e.g. torch-pruning's, "
                             "routesurgeon.tp_anchor) with narrower layers; this module has "
                             "neither")
    full = surgeon.traced.eval_graph
    full_params = {id(p) for p in full.parameters()}
    modes = {m: m.training for m in [*route.modules(), *full.modules()]}
    route.eval()
    full.eval()
    gen = torch.Generator().manual_seed(seed)
    once_route, once_full = _called_once(route), _called_once(full)
    try:
        for path, _keep_in, keep_out in targets:
            mine = route.get_submodule(path)
            if any(id(p) in full_params for p in mine.parameters()):
                mine = copy.deepcopy(mine)  # never change the full model
                _set_module(route, path, mine)
            xtx: torch.Tensor | None = None
            xty: torch.Tensor | None = None
            for inputs in data:
                x = _capture(route, path, inputs, "in", path in once_route)
                y = _capture(full, path, inputs, "out", path in once_full)
                xs, ys = _rows(mine, x, y, keep_out, rows_per_batch, gen)
                a, b = xs.T @ xs, xs.T @ ys
                xtx = a if xtx is None else xtx + a
                xty = b if xty is None else xty + b
            assert xtx is not None and xty is not None
            lam = ridge * float(xtx.diagonal().mean()) + 1e-12
            sol = torch.linalg.solve(xtx + lam * torch.eye(len(xtx), dtype=xtx.dtype), xty)
            weight = cast(torch.Tensor, mine.weight)
            bias = cast("torch.Tensor | None", getattr(mine, "bias", None))
            w = (sol[:-1] if bias is not None else sol).T.reshape(weight.shape)
            weight.copy_(w.to(weight.dtype))
            if bias is not None:
                bias.copy_(sol[-1].to(bias.dtype))
    finally:
        for mod, training in modes.items():
            mod.training = training
    if isinstance(info, RouteInfo):
        cast(fx.GraphModule, route).meta["routesurgeon"] = dataclasses.replace(
            info, reconstructed=len(data))
    else:
        route.rs_reconstructed = len(data)  # type: ignore[assignment]
    if recalibrate_after:
        recalibrate(route, [(d, {}) for d in data], batches=len(data))
    return route
