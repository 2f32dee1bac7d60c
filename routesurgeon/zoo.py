"""Multi-output models by name, the way timm and smp users name them.

``build_model("timm:resnet50", features_only=True)``, ``build_model("timm:convnext_tiny", heads=3)``
(a backbone with three linear heads), ``build_model("smp:Unet:resnet34", aux_classes=5)`` or
``build_model("module:my.package:factory")``. Every model is built with random weights
(``pretrained=False`` / ``encoder_weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from routesurgeon.errors import InputError

__all__ = ["BuiltModel", "MultiExit", "MultiHead", "build_model", "multi_exit"]


class MultiHead(nn.Module):
    """A pooled-feature backbone shared by several heads; returns ``{head: output}``."""

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.backbone(x)
        return {name: head(z) for name, head in self.heads.items()}


class MultiExit(nn.Module):
    """A backbone's intermediate stages, each followed by a classifier exit: ``{exitK: logits}``."""

    def __init__(self, features: nn.Module, channels: Sequence[int], num_classes: int,
                 names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.features = features
        names = list(names or [f"exit{i}" for i in range(len(channels))])
        if len(names) != len(channels):
            raise InputError(f"{len(names)} exit names for {len(channels)} stages")
        self.names = names
        self.exits = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, num_classes))
            for c in channels
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.features(x)
        feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
        return {name: head(f) for name, head, f in zip(self.names, self.exits, feats)}


def multi_exit(
    model: nn.Module,
    stages: Sequence[int] | None = None,
    num_classes: int | None = None,
    return_nodes: Sequence[str] | None = None,
    example_inputs: Tensor | None = None,
) -> MultiExit:
    """Attach a classifier exit to each chosen stage of ``model``; exits are tasks like any other.

    For a timm model, ``stages`` are indices into ``model.feature_info`` (default: every stage) and
    the stages reuse the model's own modules (its parameters, not copies). For any other model give
    ``return_nodes`` (module paths or fx node names, as torchvision's ``create_feature_extractor``
    takes them) and ``example_inputs`` to size the exits.
    """
    if num_classes is None:
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        if num_classes <= 0:
            raise InputError("multi_exit needs num_classes (the model has no classifier to copy)")
    info = getattr(model, "feature_info", None)
    if return_nodes is None and info is not None:
        from timm.models import FeatureListNet

        n = len(info)
        idx = list(stages) if stages is not None else list(range(n))
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise InputError(f"stages {bad} out of range: {type(model).__name__} has {n} "
                             f"feature stages (0..{n - 1})")
        idx = [i % n for i in idx]
        features = FeatureListNet(model, out_indices=tuple(idx))
        channels = features.feature_info.channels()
        return MultiExit(features, channels, num_classes)
    if return_nodes is None:
        raise InputError(f"{type(model).__name__} has no timm feature_info: pass return_nodes=[...]"
                         f" (module paths whose outputs feed the exits) and example_inputs")
    if example_inputs is None:
        raise InputError("multi_exit with return_nodes needs example_inputs to size the exits")
    from torchvision.models.feature_extraction import create_feature_extractor

    features = create_feature_extractor(model, return_nodes={n: n for n in return_nodes})
    with torch.no_grad():
        was = features.training
        features.eval()
        outs = features(example_inputs)
        features.train(was)
    channels = [int(v.shape[1]) for v in outs.values()]
    return MultiExit(features, channels, num_classes)


@dataclass
class BuiltModel:
    """A model built from a spec, with an example input and its task names."""

    spec: str
    model: nn.Module
    example_inputs: Tensor
    tasks: list[str] | None = None


def _input(size: int | Sequence[int], batch: int = 2, channels: int = 3) -> Tensor:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(0))


def _timm(name: str, features_only: bool, heads: int, num_classes: int,
          input_size: int | None, **kwargs: Any) -> BuiltModel:
    import timm

    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:8]
        raise InputError(f"timm has no model {name!r}" + (f"; close: {close}" if close else ""))
    if features_only:
        model = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        size = input_size or _timm_size(model)
        # the selected stages (out_indices), not all
        n = len(cast(Any, model.feature_info).channels())
        return BuiltModel(f"timm:{name}", model.eval(), _input(size),
                          [f"stage{i}" for i in range(n)])
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    # models with a conv head after pooling (mobilenetv3, ghostnet, lcnet) return that width
    width = getattr(backbone, "head_hidden_size", None) or cast(int, backbone.num_features)
    names = ["cls", "aux", *(f"head{i}" for i in range(2, heads))][:heads]
    model = MultiHead(backbone, {n: nn.Linear(width, num_classes) for n in names})
    size = input_size or _timm_size(backbone)
    return BuiltModel(f"timm:{name}", model.eval(), _input(size), names)


def _timm_size(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[1]), int(size[2])


def _smp(arch: str, encoder: str, aux_classes: int | None, num_classes: int,
         input_size: int | None, **kwargs: Any) -> BuiltModel:
    import segmentation_models_pytorch as smp

    aux = {"classes": aux_classes} if aux_classes else None
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None,
                                 classes=num_classes, aux_params=aux, **kwargs)
    except KeyError as e:
        raise InputError(f"smp cannot build {arch} with encoder {encoder!r}: {e}") from e
    tasks = ["mask", "label"] if aux else ["mask"]
    return BuiltModel(f"smp:{arch}:{encoder}", model.eval(), _input(input_size or 128), tasks)


def _factory(path: str, factory: str, **kwargs: Any) -> BuiltModel:
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise InputError(f"cannot import {path!r} for module:{path}:{factory}: {e}") from e
    fn = getattr(module, factory, None)
    if fn is None:
        raise InputError(f"{path} has no attribute {factory!r}")
    made = fn(**kwargs)
    if isinstance(made, tuple):  # factory returns (model, example_inputs)
        model, example = made
    else:
        model, example = made, getattr(made, "example_inputs", None)
        if callable(example):
            example = example()
        if example is None:
            raise InputError(f"{path}:{factory} must return (model, example_inputs) or a model "
                             f"with an example_inputs attribute")
    return BuiltModel(f"module:{path}:{factory}", model, example)


def build_model(
    spec: str,
    *,
    features_only: bool = False,
    heads: int = 3,
    aux_classes: int | None = None,
    num_classes: int = 10,
    input_size: int | None = None,
    aux: bool = False,
    **kwargs: Any,
) -> BuiltModel:
    """Build a multi-output model from ``timm:NAME``, ``smp:ARCH:ENCODER`` or ``module:PATH:FN``.

    timm models become multi-output either as ``features_only`` feature pyramids or as a backbone
    with ``heads`` linear heads; smp models get an auxiliary classification head when
    ``aux_classes`` is given (their two outputs are the tasks ``mask`` and ``label``).
    ``tv:NAME`` (``tv:NAME:heads`` for a detector's backbone + FPN + heads; ``aux``: a model's own
    auxiliary outputs) and ``hf:CLASS`` (a transformers class from a small config) are built by
    ``routesurgeon.zoo_tv`` and ``routesurgeon.zoo_hf``.
    """
    kind, _, rest = spec.partition(":")
    if kind == "timm" and rest:
        return _timm(rest, features_only, heads, num_classes, input_size, **kwargs)
    if kind == "smp" and rest.count(":") == 1:
        arch, encoder = rest.split(":")
        return _smp(arch, encoder, aux_classes, num_classes, input_size, **kwargs)
    if kind == "tv" and rest and rest.count(":") <= 1:
        from routesurgeon.zoo_tv import build_tv

        name, _, part = rest.partition(":")
        return cast(BuiltModel, build_tv(name, part, aux=aux, heads=heads,
                                         num_classes=num_classes, input_size=input_size,
                                         **kwargs))
    if kind == "hf" and rest and ":" not in rest:
        from routesurgeon.zoo_hf import build_hf

        return cast(BuiltModel, build_hf(rest, num_classes=num_classes, **kwargs))
    if kind == "module" and rest.count(":") == 1:
        path, factory = rest.split(":")
        return _factory(path, factory, **kwargs)
    raise InputError(f"cannot read model spec {spec!r}; use timm:NAME (e.g. timm:resnet50), "
                     f"smp:ARCH:ENCODER (e.g. smp:Unet:resnet34), tv:NAME (e.g. tv:googlenet), "
                     f"hf:CLASS (e.g. hf:BertForPreTraining) or module:package.module:factory")
