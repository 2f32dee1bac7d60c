"""Example inputs: normalising them and binding them to ``forward``'s signature."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from routesurgeon.errors import InputError

__all__ = ["ExampleInputs", "bind_inputs", "normalize_inputs"]


ExampleInputs = Any


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as ``(args, kwargs)``: a tensor, a tuple/list of args or a kwargs dict."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(
        f"example_inputs must be a Tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def bind_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{sig}: {e}"
        ) from e
    return dict(bound.arguments)


def _concrete_args(bound: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Non-tensor inputs are baked into the graph as constants."""
    sig = inspect.signature(model.forward)
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in bound and not isinstance(bound[name], torch.Tensor):
            out[name] = bound[name]
        elif name not in bound and p.default is not p.empty:
            out[name] = p.default
    return out
