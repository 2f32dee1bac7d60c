"""Building and instrumenting a model from the command line: its arguments, their types, and
the hints for a misspelt timm or smp name."""

from __future__ import annotations

import argparse
import difflib
import importlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import nn

from routesurgeon.cli._output import _status
from routesurgeon.errors import InputError


@dataclass(frozen=True)
class Loaded:
    """A built and instrumented model with what it took."""

    spec: str
    surgeon: Any  # routesurgeon.Surgeon (imported lazily: keeps ``--help`` fast)
    build_seconds: float
    input_shapes: list[list[int]]


def _input_size(text: str) -> int | tuple[int, int]:
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"input size must be S or HxW (e.g. 224 or 256x512), got {text!r}"
        ) from None


def _keep(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep takes a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"--keep takes a fraction in (0, 1], got {v}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _formats(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in items if t not in ("pt", "pt2", "onnx")]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"formats are among pt, pt2, onnx; got {text!r}")
    return tuple(dict.fromkeys(("pt", *items)))


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"expected a comma-separated list, got {text!r}")
    return items


def _leaf_modules(model: nn.Module, names: Sequence[str]) -> list[str | type]:
    """Each name is a submodule path of the model (``layer4.0``) or an importable class
    (``timm.layers.SqueezeExcite``)."""
    out: list[str | type] = []
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            pass
        else:
            out.append(name)
            continue
        mod_name, _, cls_name = name.rpartition(".")
        cls = None
        if mod_name:
            try:
                cls = getattr(importlib.import_module(mod_name), cls_name, None)
            except ImportError:
                cls = None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise InputError(
                f"--leaf-modules {name!r} is neither a submodule path of "
                f"{type(model).__name__} (e.g. 'layer4.0') nor an importable nn.Module class "
                f"(e.g. 'timm.layers.SqueezeExcite')"
            )
        out.append(cls)
    return out


def _task_arg(built: Any, tasks: list[str] | None) -> Any:
    """Task names for ``instrument``: the zoo's names, or the user's (all or a subset)."""
    if tasks is None or built.tasks is None or not set(tasks) < set(built.tasks):
        return tasks if tasks is not None else built.tasks
    # A subset of the zoo's names: map each to the output it names (zoo names are positional
    # for tuple/list outputs, e.g. features_only stages or smp's (mask, label)).
    from routesurgeon.outputs import output_names
    from routesurgeon.tracing import normalize_inputs

    model = built.model
    args, kwargs = normalize_inputs(built.example_inputs)
    was = model.training
    try:
        with torch.no_grad():
            model.eval()
            out = model(*args, **kwargs)
    finally:
        model.train(was)
    names = [n for n, v in output_names(out) if isinstance(v, torch.Tensor)]
    if len(names) != len(built.tasks):
        return tasks
    return {t: names[built.tasks.index(t)] for t in tasks}


def _spec_hint(spec: str) -> str:
    """'; did you mean timm:resnet50?' for a bare or misspelt timm name, else ''."""
    try:
        import timm
    except ImportError:
        return ""
    if ":" not in spec:
        return f"; did you mean timm:{spec}?" if timm.is_model(spec) else ""
    kind, _, name = spec.partition(":")
    if kind == "timm" and name:
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.8)
        if close:
            return "; did you mean " + " or ".join(f"timm:{c}" for c in close) + "?"
    return ""


def _smp_error(spec: str) -> InputError | None:
    """A short error for an unknown smp architecture or encoder (smp's own lists them all)."""
    kind, _, rest = spec.partition(":")
    if kind != "smp" or rest.count(":") != 1:
        return None
    import segmentation_models_pytorch as smp

    arch, encoder = rest.split(":")
    archs = {k.lower(): c.__name__ for k, c in smp.MODEL_ARCHITECTURES_MAPPING.items()}
    if arch.lower() not in archs:
        return InputError(
            f"smp has no architecture {arch!r}; use one of {', '.join(sorted(archs.values()))}"
        )
    names = smp.encoders.get_encoder_names()
    if encoder in names or encoder.startswith("tu-"):
        return None
    close = difflib.get_close_matches(encoder, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return InputError(
        f"smp has no encoder {encoder!r}; {hint}any timm model works as tu-NAME "
        f"(e.g. smp:{arch}:tu-resnet50); smp's own encoders are listed by "
        f"segmentation_models_pytorch.encoders.get_encoder_names()"
    )


def _load(args: argparse.Namespace, err: Console) -> Loaded:
    import routesurgeon as rs

    t0 = time.perf_counter()
    with _status(err, f"building {args.model}"):
        kwargs: dict[str, Any] = {}
        if args.input_size is not None:
            kwargs["input_size"] = args.input_size
        try:
            built = rs.build_model(
                args.model,
                features_only=args.features_only,
                heads=args.heads,
                aux_classes=args.aux_classes,
                aux=getattr(args, "aux", False),
                num_classes=args.num_classes,
                **kwargs,
            )
        except InputError as e:
            raise (_smp_error(args.model) or InputError(f"{e}{_spec_hint(args.model)}")) from e
        except ImportError as e:
            if not args.model.startswith(("timm:", "smp:", "tv:", "hf:")):
                raise
            extra = "hf] (transformers)" if args.model.startswith("hf:") else (
                "models] (timm, segmentation-models-pytorch, torchvision)")
            raise InputError(
                f"{args.model} needs {e.name or 'a missing package'}: "
                f"pip install 'routesurgeon[{extra}'"
            ) from e
    leaves = _leaf_modules(built.model, _split(args.leaf_modules) or [])
    tasks = _task_arg(built, _split(args.tasks))
    with _status(err, f"tracing {args.model}"):
        surgeon = rs.instrument(built.model, built.example_inputs, tasks=tasks, leaf_modules=leaves)
    inputs = built.example_inputs
    tensors = (
        [inputs]
        if isinstance(inputs, torch.Tensor)
        else (list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs))
    )
    shapes = [list(x.shape) for x in tensors if isinstance(x, torch.Tensor)]
    return Loaded(built.spec, surgeon, time.perf_counter() - t0, shapes)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="timm:NAME (timm:resnet50), smp:ARCH:ENCODER (smp:Unet:resnet34), tv:NAME "
        "(tv:googlenet; tv:retinanet_resnet50_fpn:heads for a detector's backbone + FPN + heads), "
        "hf:CLASS (hf:BertForPreTraining) or module:package.module:factory",
    )
    p.add_argument(
        "--aux",
        action="store_true",
        help="tv: the model's own auxiliary outputs (GoogLeNet/Inception v3 aux logits, "
        "DeepLabV3/FCN aux_loss)",
    )
    p.add_argument(
        "--features-only", action="store_true", help="timm: the feature pyramid, one task per stage"
    )
    p.add_argument(
        "--heads",
        type=int,
        default=3,
        metavar="N",
        help="timm: number of linear heads on the pooled features (default 3)",
    )
    p.add_argument(
        "--aux-classes",
        type=int,
        default=None,
        metavar="N",
        help="smp: add the auxiliary classification head with N classes",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=10,
        metavar="N",
        help="classes per head / segmentation classes (default 10)",
    )
    p.add_argument(
        "--input-size",
        type=_input_size,
        default=None,
        metavar="S",
        help="example input size S or HxW (default: timm's pretrained size, 128 for smp)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        metavar="a,b,c",
        help="task names: a subset of the outputs, or one new name per output",
    )
    p.add_argument(
        "--leaf-modules",
        default=None,
        metavar="mod.Class,...",
        help="submodule paths or importable classes to trace as opaque ops",
    )
