"""Task-specific importance variables and the dynamic-route algebra of DR-MGF.

For every shared conv/linear weight W (two or more tasks reach it) and every task t sharing it:
``A_t`` (learnable importance, init: the L2 norm of each filter or connection) and ``S_t`` (meta
scale, init ``s0``). Shared norm layers get ``S_t`` only (their ``A`` is 1). See
``../shared/method/drmgf.md`` sections 1-3; the equations are implemented here once and used by
both the reference algorithm and the per-step variant.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import Tensor, nn

__all__ = ["ImportanceBank", "RouteConfig", "dominance", "gate", "lrn"]


@dataclass(frozen=True)
class RouteConfig:
    """Hyperparameters of the dynamic routes (the authors' defaults)."""

    granularity: str = "filter"  # "filter" (A_t: [O]) or "connection" (A_t: [O, I])
    rho: float = 10.0
    beta: float = 1e-4
    gamma: float = 0.75
    s0: float = 1e-3
    # Filter granularity: a shared plain conv/linear is gated on its activations when its
    # output has at most this many times its weight's elements, else on its weight (cheaper
    # for early layers: large outputs, small kernels). Both are exact; this only sets the cost.
    activation_gate_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.granularity not in ("filter", "connection"):
            raise ValueError(
                f"granularity must be 'filter' or 'connection', got {self.granularity!r}"
            )


def _norm_dims(weight: Tensor, granularity: str) -> tuple[int, ...]:
    """Dims reduced by the per-filter (or per-connection) norm of a conv/linear weight."""
    start = 1 if granularity == "filter" else 2
    return tuple(range(start, weight.dim()))


def unit_kernel(weight: Tensor, granularity: str, eps: float = 1e-12) -> Tensor:
    """W / ||W||, the norm per filter or per connection."""
    dims = _norm_dims(weight, granularity)
    if not dims:  # a linear weight at connection granularity: each entry is a connection
        return weight / weight.abs().clamp_min(eps)
    return weight / torch.linalg.vector_norm(weight, dim=dims, keepdim=True).clamp_min(eps)


def slice_norms(weight: Tensor, granularity: str) -> Tensor:
    """The L2 norm of each filter ([O]) or each connection ([O, I])."""
    dims = _norm_dims(weight, granularity)
    w = weight.detach()
    return w.abs() if not dims else torch.linalg.vector_norm(w, dim=dims)


def lrn(a: Tensor, beta: float, gamma: float) -> Tensor:
    """P = |A| / (1 + beta * sum_inputs |A|) ** gamma.

    At connection granularity the sum runs over a filter's inputs; at filter granularity A has no
    input axis, so each filter is normalised by its own magnitude.
    """
    mag = a.abs()
    total = mag.sum(dim=-1, keepdim=True) if a.dim() == 2 else mag
    return mag / (1.0 + beta * total) ** gamma


def gate(importances: Sequence[Tensor], t: int, cfg: RouteConfig) -> Tensor:
    """G_t = (rho * P_t + sum_{j != t} P_j) / (rho + n - 1)."""
    ps = [lrn(a, cfg.beta, cfg.gamma) for a in importances]
    n = len(ps)
    others = sum(p for j, p in enumerate(ps) if j != t)
    return (cfg.rho * ps[t] + others) / (cfg.rho + n - 1)


def gated_weight(weight: Tensor, importances: Sequence[Tensor], t: int, cfg: RouteConfig
                 ) -> Tensor:
    """W_eff_t = G_t * W / ||W|| (G broadcast over the kernel).

    Computed by ``_GatedKernel``: one norm and one product forward, and a closed-form backward of
    two full-size products, instead of autograd's chain through the division and the norm (the
    per-weight elementwise work dominates this reparametrisation on small inputs).
    """
    g = gate(importances, t, cfg)
    g = g.reshape(*g.shape, *([1] * (weight.dim() - g.dim())))
    return _GatedKernel.apply(weight, g, _norm_dims(weight, cfg.granularity))


class _GatedKernel(torch.autograd.Function):
    """``g * W / max(||W||, eps)``, the norm over ``dims`` (elementwise ``|W|`` when empty).

    Backward, with ``n = ||W||``, ``c = max(n, eps)`` and ``dot = sum_dims(grad * W)``:
    ``dL/dg = dot / c`` and ``dL/dW = grad * g / c - W * g * dot / n**3`` (the second term only
    where ``n > eps``, where the clamp passes the gradient).
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, g: Tensor, dims: tuple[int, ...]) -> Tensor:
        n = weight.abs() if not dims else torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
        c = n.clamp_min(_EPS)
        ctx.dims = dims
        ctx.save_for_backward(weight, g, n, c)
        return weight * (g / c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        weight, g, n, c = ctx.saved_tensors
        need_w, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # one full-size buffer: grad * W (summed per slice), then reused for dL/dW
        buf = torch.mul(grad, weight)
        dot = buf.sum(dim=ctx.dims, keepdim=True) if ctx.dims else buf.clone()
        grad_g = _unbroadcast(dot / c, g) if need_g else None
        grad_w = None
        if need_w:
            b = torch.where(n > _EPS, -g * dot / (c * c * c), 0.0)
            grad_w = torch.mul(grad, g / c, out=buf).addcmul_(weight, b)
        return grad_w, grad_g, None


_EPS = 1e-12


class _ActivationGated(torch.autograd.Function):
    """A conv or linear layer gated per output filter on its activations, not its weights.

    With the norm per filter, ``conv(x, g * W / ||W||) + b == s * y + b`` with ``y = conv(x, W)``
    and the per-filter scalar ``s = g / max(||W||, eps)``: the forward reads W once for the norm
    and writes no gated copy of it. Backward: one native conv backward of ``gs = s * grad``
    gives the input gradient and ``s * dL/dW_eff``. ``_GatedKernel``'s per-filter
    ``dot = sum(dL/dW_eff * W)`` equals ``sum(grad * y)`` over the batch and positions (the conv
    is linear in W), so ``dL/dg = dot / c`` and ``dL/dW = s * dL/dW_eff - W * s * dot / (c * n)``
    (where ``n > eps``), its closed form, from the saved ``y``.

    Under autocast the layer runs as autocast runs it: ``x`` and ``W`` cast to the autocast
    dtype for the conv (``y`` and the output in it, the bias and ``s`` cast too); the norms,
    ``s``, the per-filter sums and the gradients of ``W``, the bias and ``g`` stay in the
    parameters' dtype, the input gradient in ``x``'s.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, g: Tensor,
                conv: tuple[Any, ...] | None) -> Tensor:
        n = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())))
        c = n.clamp_min(_EPS)
        s = g / c
        view = (-1, *([1] * (weight.dim() - 2)))  # broadcasts over the output's channel dim
        dev = x.device.type
        low = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
               and torch.float64 not in (x.dtype, weight.dtype) else None)  # autocast skips f64
        ctx.x_dtype = x.dtype
        with _autocast_off(dev):
            xin, w = (x.to(low), weight.to(low)) if low is not None else (x, weight)
            if conv is None:
                y = torch.nn.functional.linear(xin, w)
            else:
                stride, padding, dilation, groups = conv
                y = torch.convolution(xin, w, None, stride, padding, dilation, False,
                                      [0] * len(stride), groups)
            sv = s.to(y.dtype).view(view)
            out = (torch.addcmul(bias.to(y.dtype).view(view), y, sv) if bias is not None
                   else y * sv)
        ctx.conv = conv
        ctx.save_for_backward(xin, weight, n, c, s, y)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, n, c, s, y = ctx.saved_tensors
        with _autocast_off(grad.device.type):
            return _activation_gated_backward(ctx, grad.to(y.dtype), x, weight, n, c, s, y)


def _activation_gated_backward(ctx: Any, grad: Tensor, x: Tensor, weight: Tensor, n: Tensor,
                               c: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor | None, ...]:
    """``_ActivationGated.backward``; ``grad``, ``x`` and ``y`` in the conv's dtype."""
    need_x, need_w, need_b, need_g = ctx.needs_input_grad[:4]
    conv = ctx.conv
    acc = weight.dtype  # the per-filter sums and the parameter gradients
    view = (-1, *([1] * (weight.dim() - 2)))
    chan = (grad.dim() - 1) if conv is None else (grad.dim() - weight.dim() + 1)
    other = [d for d in range(grad.dim()) if d != chan]
    grad_b = None
    if need_b:
        grad_b = grad.sum(dim=other, dtype=acc) if other else grad.to(acc, copy=True)
    dot = None
    if need_w or need_g:
        prod = grad * y
        dot = prod.sum(dim=other, dtype=acc) if other else prod.to(acc)
    grad_x = grad_w = None
    if need_x or need_w:
        gs = grad * s.to(grad.dtype).view(view)
        w = weight.to(grad.dtype)
        if conv is None:
            grad_x = gs.matmul(w) if need_x else None
            if need_w:
                grad_w = gs.reshape(-1, w.shape[0]).t().mm(x.reshape(-1, w.shape[1]))
        else:
            stride, padding, dilation, groups = conv
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                gs, x, w, None, stride, padding, dilation, False, [0] * len(stride),
                groups, [need_x, need_w, False])
    if need_w:
        assert dot is not None and grad_w is not None
        coef = torch.where(n > _EPS, -s * dot / (c * n), 0.0)
        grad_w = grad_w.to(acc).addcmul_(weight, coef.view(-1, *([1] * (weight.dim() - 1))))
    if grad_x is not None:
        grad_x = grad_x.to(ctx.x_dtype)
    grad_g = dot / c if need_g and dot is not None else None
    return grad_x, grad_w, grad_b, grad_g, None


def _autocast_off(device_type: str) -> Any:
    """A context that disables autocast on ``device_type`` when it is on (else a no-op)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_ACTIVATION_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _activation_gateable(module: nn.Module) -> bool:
    """Whether ``_gated_layer`` computes exactly what ``module`` computes with a gated weight:
    a plain Conv1d/2d/3d (zero padding given as numbers) or Linear, no hooks of its own."""
    if type(module) not in _ACTIVATION_TYPES or module._forward_hooks or module._forward_pre_hooks:
        return False
    if isinstance(module, nn.Linear):
        return True
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _gated_layer(module: nn.Module, gate_: Tensor, x: Tensor, ratio: float) -> Tensor:
    """``module(x)`` with its weight gated per filter: on its activations
    (``_ActivationGated``) when its output is at most ``ratio`` times the weight's size, else
    on its weight (``_GatedKernel``: cheaper for early layers with large outputs and small
    kernels). An empty gate (the task does not reach the layer): plain."""
    if not gate_.numel():
        return module(x)
    w = cast(Tensor, module.weight)
    if isinstance(module, nn.Linear):
        conv = None
        out_numel = x.numel() // max(w.shape[1], 1) * w.shape[0]
    else:
        c = cast(nn.modules.conv._ConvNd, module)
        conv = (list(c.stride), list(c.padding), list(c.dilation), c.groups)
        out_numel = _conv_out_numel(x, w, conv)
    if out_numel > ratio * w.numel():
        wg = _GatedKernel.apply(w, gate_.reshape(-1, *([1] * (w.dim() - 1))),
                                tuple(range(1, w.dim())))
        if conv is None:
            return torch.nn.functional.linear(x, wg, cast("Tensor | None", module.bias))
        return module._conv_forward(x, wg, module.bias)  # type: ignore[operator]
    unbatched = conv is not None and x.dim() == w.dim() - 1
    y = _ActivationGated.apply(x.unsqueeze(0) if unbatched else x, w, module.bias, gate_, conv)
    return y.squeeze(0) if unbatched else y


def _conv_out_numel(x: Tensor, w: Tensor, conv: tuple[Any, ...]) -> int:
    stride, padding, dilation, _ = conv
    k = w.dim() - 2
    size = x.shape[0] * w.shape[0] if x.dim() == w.dim() else w.shape[0]
    for i in range(k):
        length = x.shape[x.dim() - k + i]
        size *= (length + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
    return size


def _has_hooks(modules: Sequence[nn.Module]) -> bool:
    """Whether a module call would run hooks that ``_gated_layer`` bypasses. (Autocast is not
    bypassed: ``_ActivationGated`` casts as autocast does.)"""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _unbroadcast(x: Tensor, like: Tensor) -> Tensor:
    """Sum ``x`` over the dims where ``like`` was broadcast (size 1 in ``like``)."""
    if x.shape == like.shape:
        return x
    pairs = enumerate(zip(x.shape, like.shape, strict=True))
    dims = [i for i, (a, b) in pairs if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True)


def importance_share(a: Tensor) -> Tensor:
    """``|A| / sum_inputs |A|``: the A factor of pi in the dominance (over the layer's filters at
    filter granularity, where A has no input axis)."""
    mag = a.abs()
    denom = mag.sum(dim=-1, keepdim=True) if a.dim() >= 1 else mag
    return mag / denom.clamp_min(1e-12)


def dominance(importances: Sequence[Tensor], scales: Sequence[Tensor]) -> Tensor:
    """D_t = pi_t / sum_j pi_j with pi_t = (|A_t| / sum_inputs |A_t|) * |S_t|; shape [T, ...].

    With no input axis (filter granularity) the normalisation runs over the layer's filters.
    """
    pi = torch.stack([importance_share(a) * s.abs() for a, s in zip(importances, scales)])
    return pi / pi.sum(dim=0, keepdim=True).clamp_min(1e-30)


class ImportanceBank(nn.Module):
    """``A_t`` and ``S_t`` for every shared weight, keyed by the weight's parameter name."""

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        norms: Mapping[str, Tensor],
        tasks_of: Mapping[str, Sequence[str]],
        cfg: RouteConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.trained = False  # set by the training methods once importance has been learned
        self.names = sorted(weights)
        self.tasks_of = {n: list(tasks_of[n]) for n in self.names}
        self.norm_names = sorted(norms)
        self.norm_tasks = {n: list(tasks_of[n]) for n in self.norm_names}
        # The bias (beta) of a shared norm has its own meta scales, as in the authors' fusion
        # (model_segnet_mt_DRMGF / DRMGF_multi_task_0202_fusionextra.py: S per 1-D parameter).
        for n in self.norm_names:
            self.norm_tasks[_bias_of(n)] = self.norm_tasks[n]
        self.A = nn.ParameterDict()
        self.S = nn.ParameterDict()
        for name in self.names:
            init = slice_norms(weights[name], cfg.granularity).float()
            for t in self.tasks_of[name]:
                self.A[_key(name, t)] = nn.Parameter(init.clone())
                self.S[_key(name, t)] = nn.Parameter(torch.full_like(init, cfg.s0))
        for name in self.norm_names:
            size = norms[name].shape[0]
            for t in self.norm_tasks[name]:
                dev = norms[name].device  # the norm's device, as the weights' A and S
                self.S[_key(name, t)] = nn.Parameter(torch.full((size,), cfg.s0, device=dev))
                self.S[_key(_bias_of(name), t)] = nn.Parameter(
                    torch.full((size,), cfg.s0, device=dev))

    # -- accessors -----------------------------------------------------------------------------
    def a(self, name: str) -> list[Tensor]:
        return [self.A[_key(name, t)] for t in self.tasks_of[name]]

    def s(self, name: str) -> list[Tensor]:
        tasks = self.tasks_of.get(name) or self.norm_tasks[name]
        return [self.S[_key(name, t)] for t in tasks]

    def importance_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.A.values()

    def scale_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.S.values()

    def gated_weights(self, params: Mapping[str, Tensor], task: str) -> dict[str, Tensor]:
        """Effective weights of ``task``'s gated forward for every shared weight it reaches."""
        out = {}
        for name in self.names:
            tasks = self.tasks_of[name]
            if task in tasks:
                out[name] = gated_weight(params[name], self.a(name), tasks.index(task), self.cfg)
        return out

    @torch.no_grad()
    def bake_(self, params: Mapping[str, Tensor], task: str) -> None:
        """``W := G_t * W / ||W||`` in place for every shared weight in ``params`` that ``task``
        reaches: the values of ``gated_weights``, without a gated copy of each weight."""
        for name in self.names:
            tasks = self.tasks_of[name]
            if task not in tasks or name not in params:
                continue
            w = params[name]
            scale = (gate(self.a(name), tasks.index(task), self.cfg)
                     / slice_norms(w, self.cfg.granularity).clamp_min(_EPS))
            w.mul_(scale.reshape(*scale.shape, *([1] * (w.dim() - scale.dim()))))

    def gated_call(self, gm: fx.GraphModule, params: Mapping[str, Tensor], task: str,
                   args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> Any:
        """``task``'s gated forward of the traced graph ``gm`` (the model's, its parameters
        ``params`` by name): ``functional_call(gm, self.gated_weights(params, task), ...)``.

        At filter granularity each shared plain conv/linear layer is gated on its output
        channels instead (``_ActivationGated``: same values and gradients, no gated copy of the
        weight, also under autocast); other layers, connection granularity and hooked modules
        take the weight path.
        """
        kw = dict(kwargs or {})
        plan = self._activation_plan(gm)
        if plan is None or _has_hooks(plan[2]):
            gated = self.gated_weights(params, task)
            return torch.func.functional_call(gm, gated, tuple(args), kw, strict=False)
        gm_act, buffers, _ = plan
        values: dict[str, Tensor] = {}
        gates = self.filter_gates(task)
        for name, g in gates.items():
            if name in buffers:
                values[buffers[name]] = g
            else:
                w = params[name]
                values[name] = _GatedKernel.apply(w, g.reshape(-1, *([1] * (w.dim() - 1))),
                                                  _norm_dims(w, "filter"))
        return torch.func.functional_call(gm_act, values, tuple(args), kw, strict=False)

    def filter_gates(self, task: str) -> dict[str, Tensor]:
        """``gate(self.a(name), t, cfg)`` for every shared weight ``task`` reaches, at filter
        granularity, in a dozen batched ops (not a dozen per layer): every A of those layers
        in one vector, P elementwise, the per-filter sum over tasks by ``index_add``."""
        if self.cfg.granularity != "filter":
            raise NotImplementedError("filter_gates is for granularity='filter'; use gate()")
        plans = self.__dict__.setdefault("_gate_plans", {})
        if task not in plans:
            names = [n for n in self.names if task in self.tasks_of[n]]
            keys, pos, own_sel, own_pos, denom, sizes = [], [], [], [], [], []
            at = start = 0
            for n in names:
                tasks = self.tasks_of[n]
                size = self.A[_key(n, tasks[0])].numel()
                for t in tasks:
                    keys.append(_key(n, t))
                    pos.append(torch.arange(start, start + size))
                    if t == task:
                        own_sel.append(torch.arange(at, at + size))
                    at += size
                own_pos.append(torch.arange(start, start + size))
                denom.append(torch.full((size,), self.cfg.rho + len(tasks) - 1))
                sizes.append(size)
                start += size
            plans[task] = (names, keys, torch.cat(pos), torch.cat(own_sel), torch.cat(own_pos),
                           torch.cat(denom), sizes, start)
        names, keys, pos, own_sel, own_pos, denom, sizes, total = plans[task]
        if not names:
            return {}
        flat = torch.cat([self.A[k].reshape(-1) for k in keys])
        dev = flat.device
        if pos.device != dev:  # the index plan moved once to A's device (a GPU), not per call
            pos, own_sel, own_pos, denom = (t.to(dev) for t in (pos, own_sel, own_pos, denom))
            plans[task] = (names, keys, pos, own_sel, own_pos, denom, sizes, total)
        p = lrn(flat, self.cfg.beta, self.cfg.gamma)  # 1-D: each filter by its own magnitude
        summed = torch.zeros(total, dtype=p.dtype, device=dev).index_add(0, pos.to(dev), p)
        own = p.index_select(0, own_sel.to(dev))
        g = (self.cfg.rho * own + (summed.index_select(0, own_pos.to(dev)) - own)) / denom.to(
            device=dev, dtype=p.dtype)
        return dict(zip(names, g.split(sizes), strict=True))

    def _activation_plan(self, gm: fx.GraphModule
                         ) -> tuple[fx.GraphModule, dict[str, str], list[nn.Module]] | None:
        """A copy of ``gm`` whose activation-gateable shared layers call ``_gated_layer`` with a
        gate buffer (empty: the plain layer), cached per graph; ``None`` at connection
        granularity or when no layer qualifies."""
        if self.cfg.granularity != "filter":
            return None
        cache = self.__dict__.setdefault("_plans", {})
        key = id(gm)
        if key in cache and cache[key][0] is gm:
            return cache[key][1]
        count: dict[int, int] = {}
        for _, p in gm.named_parameters(remove_duplicate=False):
            count[id(p)] = count.get(id(p), 0) + 1
        names = set(self.names)
        chosen = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            weight = f"{node.target}.weight"
            mod = gm.get_submodule(str(node.target))
            if (weight in names and _activation_gateable(mod)
                    and count.get(id(mod.weight)) == 1):  # not tied to another module
                chosen.append((node.target, weight, mod))
        plan = None
        if chosen:
            gm_act = fx.GraphModule(gm, copy.deepcopy(gm.graph))
            buffers: dict[str, str] = {}
            targets = {}
            for i, (target, weight, _) in enumerate(chosen):
                buffers[weight] = targets[target] = f"_rs_gate_{i}"
                gm_act.register_buffer(buffers[weight], torch.empty(0), persistent=False)
            graph = gm_act.graph
            for node in list(graph.nodes):
                if node.op == "call_module" and node.target in targets:
                    with graph.inserting_before(node):
                        mod_node = graph.get_attr(node.target)
                        gate_node = graph.get_attr(targets[node.target])
                        new = graph.call_function(_gated_layer, (
                            mod_node, gate_node, *node.args, self.cfg.activation_gate_ratio))
                    new.meta = dict(node.meta)
                    node.replace_all_uses_with(new)
                    graph.erase_node(node)
            gm_act.recompile()
            plan = (gm_act, buffers, [m for _, _, m in chosen])
        cache[key] = (gm, plan)
        return plan

    def dominance(self, name: str) -> Tensor:
        """D for the shared weight, norm weight or norm bias ``name``: [T_W, ...] in task order.

        Norm parameters have no learned A (the authors' A is 1), so pi_t = |S_t|.
        """
        if name in self.tasks_of:
            return dominance(self.a(name), self.s(name))
        scales = self.s(name)
        return dominance([torch.ones_like(s) for s in scales], scales)

    def filter_scores(self) -> dict[str, dict[str, Tensor]]:
        """Per shared weight and task, the per-filter dominance (a route score in [0, 1])."""
        out: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name in self.names:
                d = self.dominance(name)
                if d.dim() == 3:  # connection granularity: aggregate over inputs
                    d = d.mean(dim=-1)
                out[name] = {t: d[i].detach().clone() for i, t in enumerate(self.tasks_of[name])}
        return out


def _bias_of(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias"


def _key(name: str, task: str) -> str:
    return f"{name}::{task}".replace(".", "__")
