"""Gated kernels: ``g * W / ||W||`` as autograd functions (on the weight or on the activations)
and the gated call of a conv/linear layer that picks the cheaper one."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__: list[str] = []


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
