"""Leaf modules, autowrapped functions and fixes that other libraries' models need to trace."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

from torch import nn


def _library_leaves() -> tuple[set[type], set[Callable[..., Any]]]:
    leaf_types: set[type] = set()
    functions: set[Callable[..., Any]] = set()
    try:
        from timm.layers import _fx as timm_fx

        leaf_types.update(timm_fx.get_notrace_modules())
        functions.update(timm_fx.get_notrace_functions())
    except ImportError:  # timm is optional
        pass
    try:  # smp's mix-transformer LayerNorm branches on x.ndim; it is per-channel
        from segmentation_models_pytorch.encoders import mix_transformer

        ln = getattr(mix_transformer, "LayerNorm", None)
        if isinstance(ln, type):
            leaf_types.add(ln)
    except ImportError:
        pass
    return leaf_types, functions


@contextlib.contextmanager
def _library_fixes(model: nn.Module) -> Iterator[None]:
    """Known, documented fixes that make library models traceable, undone on exit."""
    changed: list[tuple[nn.Module, str, Any]] = []
    for m in model.modules():
        # smp: SegmentationModel.check_input_shape raises from Python on the input size
        if hasattr(type(m), "check_input_shape") and hasattr(m, "requires_divisible_input_shape"):
            changed.append((m, "requires_divisible_input_shape", m.requires_divisible_input_shape))
            cast(Any, m).requires_divisible_input_shape = False
    try:
        yield
    finally:
        for m, name, old in changed:
            setattr(m, name, old)


def _library_refusal(model: nn.Module) -> str | None:
    """Why a known library model cannot be traced whole, and what to trace instead."""
    if type(model).__module__.startswith("torchvision.models.detection"):
        from routesurgeon.detection import refusal

        return refusal(model)
    return None


def _library_hint(model: nn.Module) -> str:
    """What to do when a known library's model fails to trace ("" for other models)."""
    if any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
           for c in type(model).__mro__):
        return (f"{type(model).__name__} is a Hugging Face transformers model, whose forward "
                f"takes **kwargs through decorators that torch.fx cannot trace as the root: wrap "
                f"it in routesurgeon.zoo_hf.HFTasks(model, input_name='input_ids' or "
                f"'pixel_values', fields={{output field: task}}) and instrument that (or use "
                f"build_model('hf:{type(model).__name__}')).")
    return ""
