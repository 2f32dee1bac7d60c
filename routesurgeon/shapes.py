"""Running a traced graph on example inputs: shapes for the analysis, equality for trust."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree as pytree

from routesurgeon.errors import TracingError

__all__ = ["ShapeRecorder", "assert_same_outputs", "shape_of"]


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value]
    return None


def _mutable(value: Any) -> Any:
    """fx's immutable list/dict arguments as fresh plain ones, as the generated code passes them
    (torchvision's wrapped ``_get_window_and_shift_size`` assigns into its list arguments)."""
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class ShapeRecorder(fx.Interpreter):
    """An interpreter that stores each node's output shape in ``node.meta['rs_shape']``."""

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["rs_shape"] = _meta(value)
        if isinstance(value, torch.Tensor):
            n.meta["rs_dtype"] = value.dtype
        return value


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    s = node.meta.get("rs_shape")
    return s if isinstance(s, tuple) else None


def assert_same_outputs(expected: Any, got: Any, what: str) -> float:
    """Raise unless two output structures match; return the largest absolute difference."""
    e_leaves, _ = pytree.tree_flatten(expected)
    g_leaves, _ = pytree.tree_flatten(got)
    if len(e_leaves) != len(g_leaves):
        raise TracingError(f"{what}: the traced graph returns {len(g_leaves)} outputs, the model "
                           f"{len(e_leaves)}")
    worst = 0.0
    for i, (e, g) in enumerate(zip(e_leaves, g_leaves)):
        if isinstance(e, torch.Tensor):
            if not isinstance(g, torch.Tensor) or e.shape != g.shape:
                raise TracingError(f"{what}: output {i} differs in type or shape")
            if e.numel() == 0:
                continue
            diff = (e.double() - g.double()).abs().max().item()
            scale = max(1.0, e.double().abs().max().item())
            if not math.isfinite(diff) and not torch.equal(e.isnan(), g.isnan()):
                raise TracingError(f"{what}: output {i} has non-finite differences")
            if diff > 1e-5 * scale:
                raise TracingError(
                    f"{what}: output {i} differs from the model's by {diff:.3g}; the traced graph "
                    f"does not reproduce the model. Report this model, or pass leaf_modules= for "
                    f"the submodule whose forward has data-dependent Python control flow."
                )
            worst = max(worst, diff if math.isfinite(diff) else 0.0)
    return worst
