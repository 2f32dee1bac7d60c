"""Input guards: refuse what would make an instrumented model compute something else.

- ``check_call_inputs``: at call time, the tensors given to a ``Surgeon`` must match the example
  inputs in number, rank and dtype, and sit on the model's device; otherwise ``InputError`` names
  the input, what was expected and what to do (instead of an error deep inside a layer).
- ``check_inplace``: an in-place op is supported only where nobody else can observe the mutation
  (its mutated input has no other user and its own result is used, e.g. ``conv -> bn ->
  ReLU(inplace=True)`` or ``out += shortcut``). Anything else (a mutation seen through an alias,
  a side-effect-only call such as ``x.mul_(2)`` whose result is unused) would be silently dropped
  or misattributed by route extraction, so it is refused with the op and the fix named. (A
  side-effect-only op on a tensor nobody else can see, such as timm NFNet's ``out.mul_(gain)``,
  has already been rewritten out of place by ``tracing.functionalize`` when this runs.)
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from routesurgeon.errors import InputError, TracingError

__all__ = ["check_call_inputs", "check_inplace", "inplace_nodes", "named_tensors", "shape_error"]

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.setitem,
}
_NOT_MUTATING = {"requires_grad_", "share_memory_"}


def named_tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    named = [(f"positional input {i}", a) for i, a in enumerate(args)]
    named += [(f"input {k!r}", v) for k, v in kwargs.items()]
    return [(n, v) for n, v in named if isinstance(v, torch.Tensor)]


def check_call_inputs(model: nn.Module, example: Sequence[tuple[str, torch.Tensor]],
                      args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Refuse inputs whose number, rank, dtype or device cannot be what the model was traced on.

    ``example`` is ``[(name, tensor)]`` of the example inputs (only shape/dtype are read).
    """
    got = named_tensors(args, kwargs)
    if len(got) != len(example):
        raise InputError(f"the model was traced with {len(example)} tensor inputs, got "
                         f"{len(got)}; pass the same inputs as the example")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    for (name, x), (_, want) in zip(got, example):
        if x.dim() != want.dim():
            raise InputError(f"{name} has {x.dim()} dims {tuple(x.shape)}, the example had "
                             f"{want.dim()} {tuple(want.shape)}; add/remove the batch dimension")
        ok = {want.dtype} | ({param.dtype} if param is not None and want.is_floating_point()
                             else set())
        if x.dtype not in ok:
            raise InputError(f"{name} has dtype {x.dtype}, the model was traced with "
                             f"{want.dtype}; cast it (e.g. x.to({want.dtype}))")
        if param is not None and x.device != param.device:
            raise InputError(f"{name} is on {x.device} but the model's parameters are on "
                             f"{param.device}; move them to the same device first")


def shape_error(example: Sequence[tuple[str, torch.Tensor]], args: Sequence[Any],
                kwargs: dict[str, Any], err: Exception) -> InputError | None:
    """An ``InputError`` explaining ``err`` if an input's shape differs from the example's."""
    for (name, x), (_, want) in zip(named_tensors(args, kwargs), example):
        if tuple(x.shape[1:]) != tuple(want.shape[1:]):
            return InputError(f"{name} has shape {tuple(x.shape)}, the model was traced with "
                              f"{tuple(want.shape)} and fails on it: {err}")
    return None


def _mutates(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_method":
        t = str(n.target)
        return t.endswith("_") and not t.startswith("_") and t not in _NOT_MUTATING
    if n.op == "call_function":
        if n.target in _INPLACE_OPERATORS or n.kwargs.get("inplace") is True:
            return True
        name = getattr(n.target, "__name__", "")
        return (name.endswith("_") and not name.startswith("_")
                and getattr(n.target, "__module__", "") in ("torch", "torch._C._VariableFunctions"))
    if n.op == "call_module":
        return getattr(gm.get_submodule(str(n.target)), "inplace", False) is True
    return False


def inplace_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes of ``gm`` that mutate their first argument."""
    return [n for n in gm.graph.nodes if _mutates(gm, n)]


_PURE_MODULES = ("torch", "operator", "math", "builtins", "_operator")


def _unused_user_call(n: fx.Node) -> bool:
    """A call of a wrapped user function (``torch.fx.wrap``) whose result nothing uses: it can
    only matter through a side effect, e.g. torchvision MViT's ``_add_shortcut`` adding into its
    argument in place."""
    if n.op != "call_function" or n.users:
        return False
    module = getattr(n.target, "__module__", "") or ""
    return module.split(".")[0] not in _PURE_MODULES


def check_inplace(gm: fx.GraphModule) -> None:
    """Refuse in-place ops whose mutation another node could observe (see the module doc)."""
    for n in gm.graph.nodes:
        if _unused_user_call(n):
            fn = getattr(n.target, "__name__", str(n.target))
            name = f"{getattr(n.target, '__module__', '')}.{fn}"
            raise TracingError(
                f"wrapped function {name} (node {n.name!r}) returns a value nothing uses, so it "
                f"can only matter by mutating its arguments in place; route extraction would "
                f"drop it and compute something else. Make it return its result and use that "
                f"(x = f(x, ...)), or pass the module that calls it in leaf_modules=[...]."
            )
    for n in inplace_nodes(gm):
        target = n.args[0] if n.args else None
        where = str(n.target) if n.op == "call_module" else f"{n.op} {n.target}"
        if n.target is operator.setitem or not n.users:
            raise TracingError(
                f"in-place op {where!r} (node {n.name!r}) only mutates its input and its result "
                f"is unused: route extraction would drop it and compute something else. Write "
                f"it out of place (e.g. x = x * 2, torch.where / torch.cat instead of x[...] = v)."
            )
        if isinstance(target, fx.Node) and len(target.users) > 1:
            others = [u.name for u in target.users if u is not n]
            raise TracingError(
                f"in-place op {where!r} (node {n.name!r}) mutates {target.name!r}, which "
                f"{others} also read: the analysis cannot tell which value they see. Use the "
                f"out-of-place op (inplace=False, x = x + y instead of x += y)."
            )
